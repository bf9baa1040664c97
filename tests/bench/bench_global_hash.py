"""Global-scope hash reduction: time and peak RSS by chunk size on three kinds of pools of dHash codes.

``python tests/bench/bench_global_hash.py [--sizes 30000,300000]``. The greedy of
``data_prep.reduce.mih.global_reference_greedy`` materialises every near-duplicate pair inside a
chunk, so a pool of similar slices costs memory with the chunk size squared. Each run is its own
process (the peak RSS is that run's alone) on synthetic 64-bit codes:

* ``clusters``: groups of 300 codes within 4 bits of a random centre (slices of similar volumes);
* ``one-cluster``: every code within 4 bits of one centre (the worst case: everything similar);
* ``distinct``: random codes, no near-duplicates (the cost of many small chunks).

Printed: seconds and peak RSS per run, and the ratio of each chunk size to the former default 65,536.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CHUNKS = [65536, 4096, 1024]
KINDS = ["clusters", "one-cluster", "distinct"]


def codes(kind: str, n: int, seed: int = 0):  # noqa: ANN201 - numpy array
    import numpy as np

    rng = np.random.default_rng(seed)
    group = {"clusters": 300, "one-cluster": n, "distinct": 1}[kind]
    centres = rng.integers(0, 2**63, size=-(-n // group), dtype=np.int64).astype(np.uint64)
    out = np.repeat(centres, group)[:n].copy()
    if kind != "distinct":
        for _ in range(2):  # two random bit flips: within 4 bits of the centre
            out ^= np.uint64(1) << rng.integers(0, 64, size=n).astype(np.uint64)
    rng.shuffle(out)
    return out


def one(kind: str, n: int, chunk: int) -> dict:
    from data_prep.reduce.mih import global_reference_greedy

    c = codes(kind, n)
    t = time.perf_counter()
    keep, _cause = global_reference_greedy(c, 6, chunk=chunk)
    return {"seconds": time.perf_counter() - t, "kept": int(keep.sum()),
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="30000,300000")
    ap.add_argument("--one", nargs=3, metavar=("KIND", "N", "CHUNK"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one[0], int(a.one[1]), int(a.one[2]))))
        return 0
    print(f"{'pool':<12} {'codes':>8} {'chunk':>6} {'seconds':>8} {'peak RSS':>9} {'kept':>7}  vs 65,536")
    for n in (int(s) for s in a.sizes.split(",")):
        for kind in KINDS:
            ref = None
            for chunk in CHUNKS:
                r = json.loads(subprocess.run([sys.executable, __file__, "--one", kind, str(n), str(chunk)],
                                              check=True, capture_output=True, text=True).stdout)
                ref = ref or r
                print(f"{kind:<12} {n:>8,} {chunk:>6} {r['seconds']:>8.2f} {r['rss_mb']:>6.0f} MB {r['kept']:>7}"
                      f"  time x{r['seconds'] / ref['seconds']:.2f}, RSS x{r['rss_mb'] / ref['rss_mb']:.2f}")
                assert r["kept"] == ref["kept"], "the chunk size changed the selection"
    return 0


if __name__ == "__main__":
    sys.exit(main())
