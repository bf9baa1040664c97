"""Hash reduction: the paper's greedy per volume, and the global scope's multi-index hash."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.reduce import SliceSet, build_strategy
from data_prep.reduce.greedy import reference_greedy
from data_prep.reduce.mih import MultiIndexHash, global_reference_greedy


def bits(x: int) -> int:
    return bin(int(x)).count("1")


def drifting_codes(n: int, rng: np.random.Generator, flips_per_step: int = 3) -> np.ndarray:
    """A 'volume': each slice's code is the previous one with a few random bits flipped."""
    codes = [int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2))]
    for _ in range(n - 1):
        c = codes[-1]
        for b in rng.integers(0, 64, int(rng.integers(0, flips_per_step + 1))):
            c ^= 1 << int(b)
        codes.append(c)
    return np.array(codes, dtype=np.uint64)


def paper_loop(codes: np.ndarray, t: int) -> tuple[list[bool], list[int]]:
    """The procedure as the paper states it, written plainly: O(k^2) pairs of Python ints."""
    remaining = list(range(len(codes)))
    keep, cause = [False] * len(codes), [-1] * len(codes)
    while remaining:
        ref = remaining.pop(0)
        keep[ref] = True
        survivors = []
        for i in remaining:
            if bits(int(codes[i]) ^ int(codes[ref])) <= t:
                cause[i] = ref
            else:
                survivors.append(i)
        remaining = survivors
    return keep, cause


def brute_force_sequential(codes: np.ndarray, t: int) -> tuple[list[bool], list[int]]:
    """Global rule: kept iff no earlier kept code within t; cause = earliest such kept code."""
    kept: list[int] = []
    keep, cause = [False] * len(codes), [-1] * len(codes)
    for i, c in enumerate(codes):
        hits = [j for j in kept if bits(int(c) ^ int(codes[j])) <= t]
        if hits:
            cause[i] = hits[0]
        else:
            keep[i] = True
            kept.append(i)
    return keep, cause


def planted_codes(n_clusters: int, per_cluster: int, spread: int, rng: np.random.Generator) -> np.ndarray:
    """Cluster centres at random, members within `spread` bits of their centre, shuffled, plus exact copies."""
    centres = rng.integers(0, 2**63, n_clusters, dtype=np.uint64) * np.uint64(2)
    out = []
    for c in centres:
        for _ in range(per_cluster):
            x = int(c)
            for b in rng.choice(64, int(rng.integers(0, spread + 1)), replace=False):
                x ^= 1 << int(b)
            out.append(x)
    out += out[:: max(1, len(out) // 50)]  # exact duplicates too
    arr = np.array(out, dtype=np.uint64)
    return arr[rng.permutation(arr.size)]


@pytest.mark.parametrize("t", [0, 2, 6, 10, 20])
def test_volume_scope_equals_the_plain_reference_loop(t):
    rng = np.random.default_rng(t)
    series = np.repeat(np.arange(5), [40, 1, 25, 60, 7])
    codes = np.concatenate([drifting_codes(int((series == s).sum()), rng) for s in range(5)])
    index = np.concatenate([np.arange((series == s).sum()) for s in range(5)])
    data, _ = SliceSet.from_arrays(series.astype(str), index, dhash=codes)
    sel = build_strategy("hash", {"scope": "volume"})
    sel.prepare(data)
    got = sel.select(t)
    for start, stop in data.series_bounds():
        keep, cause = paper_loop(data.dhash[start:stop], t)
        assert got.keep[start:stop].tolist() == keep
        assert got.cause[start:stop].tolist() == [c + start if c >= 0 else -1 for c in cause]
    # the result is neither "keep all" nor "keep one per series" except at the extremes
    if t == 6:
        assert 5 < got.kept < len(codes) - 5


def test_volume_greedy_keeps_the_first_slice_and_drops_only_near_references():
    codes = np.array([0b0, 0b1, 0b111, 0b1111111, 0b1111110], dtype=np.uint64)
    keep, cause = reference_greedy(codes, 2)
    # 0 is kept; 1 bit and 3 bits away -> 1 dropped (by 0), 0b111 kept; 0b1111111 is 4 bits from 0b111 -> kept;
    # 0b1111110 is 1 bit from 0b1111111 -> dropped by it
    assert keep.tolist() == [True, False, True, True, False]
    assert cause.tolist() == [-1, 0, -1, -1, 3]


@pytest.mark.parametrize("t", [0, 3, 6, 12])
def test_global_scope_equals_brute_force_on_planted_near_duplicates(t):
    rng = np.random.default_rng(100 + t)
    codes = planted_codes(60, 25, spread=4, rng=rng)
    keep, cause = global_reference_greedy(codes, t, chunk=300)
    bf_keep, bf_cause = brute_force_sequential(codes, t)
    assert keep.tolist() == bf_keep
    assert cause.tolist() == bf_cause
    # recall 1.0: no two kept codes are within t, and every dropped code is within t of its cause
    kept = codes[keep]
    d = np.array([[bits(int(a) ^ int(b)) for b in kept] for a in kept])
    np.fill_diagonal(d, 99)
    assert d.min() > t
    assert all(bits(int(codes[i]) ^ int(codes[cause[i]])) <= t and cause[i] < i for i in np.flatnonzero(~keep))


def test_multi_index_query_finds_exactly_the_brute_force_pairs():
    rng = np.random.default_rng(5)
    stored = planted_codes(40, 20, spread=6, rng=rng)
    # queries: stored codes with 0-8 bits flipped, so some are within t = 6 and some just beyond
    queries = stored[rng.choice(stored.size, 200, replace=False)].copy()
    for k in range(queries.size):
        for b in rng.choice(64, int(rng.integers(0, 9)), replace=False):
            queries[k] ^= np.uint64(1) << np.uint64(int(b))
    t = 6
    for blocks in (None, 2, 3, 7):
        idx = MultiIndexHash(t, stored.size, blocks=blocks)
        idx.add(stored[:300], np.arange(300))
        idx.add(stored[300:], np.arange(300, stored.size))  # merged insert keeps the index sorted
        qi, pos = idx.query(queries)
        found = set(zip(qi.tolist(), idx.ids[pos].tolist(), strict=True))
        expected = {(i, j) for i, q in enumerate(queries) for j, s in enumerate(stored) if bits(int(q) ^ int(s)) <= t}
        assert len(expected) > 100
        assert found == expected, blocks


def test_global_scope_is_deterministic_whatever_the_chunking_and_blocks():
    rng = np.random.default_rng(9)
    codes = planted_codes(80, 30, spread=5, rng=rng)
    results = [global_reference_greedy(codes, 6, chunk=c, blocks=b)
               for c, b in [(10**6, None), (97, None), (500, 7), (500, 3)]]
    for keep, cause in results[1:]:
        assert np.array_equal(keep, results[0][0]) and np.array_equal(cause, results[0][1])


def test_global_scope_removes_near_duplicates_across_series_that_volume_scope_keeps():
    base = np.uint64(0x0F0F_F0F0_1234_5678)
    codes = np.array([base, base ^ np.uint64(0b11), base ^ np.uint64(0b101)], dtype=np.uint64)
    data, _ = SliceSet.from_arrays(np.array(["a", "b", "c"]), np.zeros(3, int), dhash=codes)
    vol, glo = build_strategy("hash", {"scope": "volume"}), build_strategy("hash", {"scope": "global"})
    vol.prepare(data)
    glo.prepare(data)
    assert vol.select(6).kept == 3  # one slice per series: nothing to compare within a volume
    sel = glo.select(6)
    assert sel.keep.tolist() == [True, False, False] and sel.cause.tolist() == [-1, 0, 0]


def test_paper_greedy_is_not_monotone_in_general():
    # a = no bits; b = bits 0-4 (5 from a); c = b + bits 5-8; d = b + bits 9-12 (each 4 from b,
    # 9 from a, 8 from each other). t=4: a and b are references, b removes c and d -> 2 kept.
    # t=6: a removes b, and then nothing removes c or d -> 3 kept. So --target-fraction must not
    # assume strict monotonicity (docs/reduction.md).
    a, b = 0, 0b11111
    c, d = b | (0b1111 << 5), b | (0b1111 << 9)
    codes = np.array([a, b, c, d], dtype=np.uint64)
    assert [bits(a ^ b), bits(b ^ c), bits(b ^ d), bits(a ^ c), bits(c ^ d)] == [5, 4, 4, 9, 8]
    assert reference_greedy(codes, 4)[0].tolist() == [True, True, False, False]
    assert reference_greedy(codes, 6)[0].tolist() == [True, False, True, True]
