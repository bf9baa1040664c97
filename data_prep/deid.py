"""Keyed pseudonyms for patient, study, series and slice identifiers.

A plain hash of a PatientID can be reversed by hashing a list of candidate IDs; an HMAC with a secret
key cannot, yet stays stable across runs (the same patient gets the same pseudonym in every shard,
which patient-level folds need). The key never leaves the machine that runs prep.

That only holds while the key cannot be guessed: PatientIDs often follow a known pattern
(``LIDC-IDRI-0001``), so anyone holding the shards can test candidate keys against a pseudonym. Hence
:func:`check_key` refuses short keys and keys that are visibly not random, and the manifest records
the key only as a salted scrypt hash (:meth:`Pseudonymizer.key_check`), which makes each guess cost
a slow hash instead of one HMAC.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import math
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ctssl_base.errors import UserError

KEY_ENV = "CTSSL_DEID_KEY"
_PREFIX = {"patient": "P", "study": "ST", "series": "SE", "slice": "SL", "task": "T"}

#: the key rules (docs/data-format.md, "Security"). A random key of `secrets.token_hex(16)` or longer
#: fails them with a probability far below 1e-6; they exist to stop placeholders, typos and words,
#: not to certify randomness, which no test of one string can.
MIN_KEY_BYTES = 32
MIN_KEY_DISTINCT = 8
MIN_KEY_BITS_PER_BYTE = 2.5
KEY_HINT = "generate one with `python -c 'import secrets; print(secrets.token_hex(32))'`"
#: scrypt cost of the key check in the manifest: ~0.1 s and 32 MiB per evaluation, so testing a list
#: of candidate keys against a manifest is slow (the key rules make the list hopeless anyway)
_SCRYPT = {"n": 2**15, "r": 8, "p": 1}


def _bits_per_byte(key: bytes) -> float:
    """Shannon entropy of the key's byte histogram (an estimate; at most log2(len(key)))."""
    n = len(key)
    return -sum(c / n * math.log2(c / n) for c in collections.Counter(key).values())


def key_weakness(key: bytes) -> str | None:
    """Why ``key`` is refused, or None when it passes the rules:

    - at least 32 bytes (a hex key of 32 characters holds 128 random bits);
    - at least 8 distinct byte values and a byte-histogram entropy of at least 2.5 bits per byte
      (random hex averages 3.6-3.8, base64 4.5+; "aaaa...", "kkkk...k" or two-letter keys fall far short);
    - not one shorter block repeated ("password" * 4, "0123456789abcdef" * 2);
    - not mostly a run of consecutive characters ("abcdefgh...", "123456...").
    """
    n = len(key)
    if n < MIN_KEY_BYTES:
        return f"{n} bytes, need at least {MIN_KEY_BYTES}"
    distinct = len(set(key))
    if distinct < MIN_KEY_DISTINCT:
        return f"only {distinct} distinct byte value(s), need at least {MIN_KEY_DISTINCT}"
    bits = _bits_per_byte(key)
    if bits < MIN_KEY_BITS_PER_BYTE:
        return f"low entropy ({bits:.1f} bits per byte, need at least {MIN_KEY_BITS_PER_BYTE})"
    for period in range(1, n // 2 + 1):
        if n % period == 0 and key == key[:period] * (n // period):
            return f"a {period}-character block repeated"
    steps = sum(abs(b - a) == 1 for a, b in zip(key, key[1:], strict=False))
    if steps * 2 > n - 1:
        return "mostly a run of consecutive characters"
    return None


def check_key(key: bytes, origin: str) -> bytes:
    """``key`` if it passes :func:`key_weakness`, else one line naming where it came from."""
    why = key_weakness(key)
    if why:
        raise UserError(f"de-identification key from {origin} is too weak: {why}; {KEY_HINT}")
    return key


class Pseudonymizer:
    """HMAC-SHA256 pseudonyms, one namespace per identifier kind."""

    def __init__(self, key: bytes):
        check_key(key, "the caller")
        self._key = key

    def __call__(self, kind: str, value: str) -> str:
        prefix = _PREFIX.get(kind, kind[:2].upper())
        mac = hmac.new(self._key, f"{kind}\x00{value}".encode(), hashlib.sha256).hexdigest()
        return f"{prefix}-{mac[:20]}"

    def key_check(self, context: str) -> dict[str, Any]:
        """A salted, slow hash of the key, so an output can refuse a resume with another key.

        It is stored in the manifest (and, inside the settings digest, in every commit record). A
        fast keyed hash there would let anyone with the output test candidate keys at millions per
        second; scrypt makes each test cost ~0.1 s and 32 MiB. The salt is derived from ``context``
        (prep's source location, which a resume must repeat anyway) rather than drawn at random,
        because the ``--shard-index`` processes of one run start at once and must all compute the
        same value without talking to each other.
        """
        salt = hashlib.sha256(b"ctssl-deid-key-check\x00" + context.encode()).digest()[:16]
        digest = hashlib.scrypt(self._key, salt=salt, maxmem=2**26, dklen=32, **_SCRYPT)
        return {"kdf": "scrypt", **_SCRYPT, "salt": salt.hex(), "hash": digest.hex()}

    def phi_digest(self, value: str) -> str:
        """A keyed digest of one identifying value.

        Commit records carry these instead of the values, so that whichever process writes the
        manifest can redact with the identifiers every worker (and every earlier run) saw, without
        any identifier being stored. Keyed like the pseudonyms, so no one without the key can test
        candidate names against them. 96 bits: a chance match of a random substring is negligible.
        """
        return hmac.digest(self._key, b"phi\x00" + value.encode(), "sha256")[:12].hex()

    def phi_digests(self, values: Iterable[str]) -> dict[str, list[str]]:
        """Digests of ``values`` (those redaction would use: 3+ characters) grouped by length, the
        form :class:`PhiIndex` reads back; JSON keys are strings, hence ``str(len)``."""
        out: dict[str, set[str]] = {}
        for v in values:
            if len(v) >= MIN_REDACT_LEN:
                out.setdefault(str(len(v)), set()).add(self.phi_digest(v))
        return {k: sorted(out[k]) for k in sorted(out, key=int)}


def load_key(key_file: str | None = None, *, allow_generate: bool = False,
             generated_path: str | None = None) -> bytes:
    """The key from ``key_file``, else ``$CTSSL_DEID_KEY``; a clear error when neither is set or the
    key breaks the rules of :func:`key_weakness` (the message names the file or the variable).

    ``allow_generate`` is for the demo only: it creates a random key (kept in ``generated_path`` so a
    rerun pseudonymises identically) instead of failing.
    """
    if key_file:
        p = Path(key_file)
        if not p.is_file():
            raise UserError(f"{key_file}: de-identification key file not found")
        key = p.read_bytes().strip()
        if not key:
            raise UserError(f"{key_file}: de-identification key file is empty")
        return check_key(key, key_file)
    env = os.environ.get(KEY_ENV, "").strip()
    if env:
        return check_key(env.encode(), f"${KEY_ENV}")
    if allow_generate and generated_path:
        gp = Path(generated_path)
        if gp.is_file():
            return check_key(gp.read_bytes().strip(), str(gp))
        gp.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_hex(32).encode()
        gp.write_bytes(key)
        gp.chmod(0o600)
        return key
    raise UserError(
        f"no de-identification key: set ${KEY_ENV} or pass --deid-key-file FILE "
        f"(e.g. `python -c 'import secrets; print(secrets.token_hex(32))' > deid.key`); "
        "patient identifiers are replaced by keyed pseudonyms and the key must stay the same across runs"
    )


#: values shorter than this are never redacted: "M", "F" or "01" would shred every path
MIN_REDACT_LEN = 3
REDACTED = "[redacted]"


def redact(text: str, phi: list[str] | set[str]) -> str:
    """``text`` with every identifying value in ``phi`` replaced by ``[redacted]``.

    Used on input paths in reject lists and logs: folders are often named by PatientID (LIDC-IDRI)
    and files by SOPInstanceUID, so a path alone can identify a patient. The rest of the path stays,
    so a person can still find the file.
    """
    for v in sorted({v for v in phi if len(v) >= MIN_REDACT_LEN}, key=len, reverse=True):
        if v in text:
            text = text.replace(v, REDACTED)
    return text


class PhiIndex:
    """Every identifier a run knows of, as keyed digests (:meth:`Pseudonymizer.phi_digests`), for
    redacting text in the process that writes the manifest.

    A worker can only redact with the identifiers it read itself, but a path can hold an identifier
    that only another worker saw: a labels CSV row naming a missing file in a patient folder (found
    before any header is read), or a folder of unreadable files named by a PatientID whose readable
    series sit elsewhere. The digests of all commit records together cover the whole run, resumed
    chunks and other ``--shard-index`` processes included. Matching hashes every substring of a
    length some identifier has, so an identifier is found anywhere in a text, as :func:`redact`
    finds it; results are cached because reject paths and reasons repeat.
    """

    def __init__(self, pseudo: Pseudonymizer):
        self._pseudo = pseudo
        self._by_len: dict[int, set[str]] = {}
        self._cache: dict[str, str] = {}

    def add(self, digests: Mapping[str, Iterable[str]]) -> None:
        for n, ds in digests.items():
            if int(n) >= MIN_REDACT_LEN:
                self._by_len.setdefault(int(n), set()).update(ds)
        self._cache.clear()

    def add_values(self, values: Iterable[str]) -> None:
        self.add(self._pseudo.phi_digests(values))

    def __len__(self) -> int:
        return sum(len(ds) for ds in self._by_len.values())

    def redact(self, text: str) -> str:
        """``text`` with every run of characters covered by a known identifier replaced by
        ``[redacted]`` (overlapping or adjacent identifiers become one marker)."""
        if not text or not self._by_len:
            return text
        hit = self._cache.get(text)
        if hit is not None:
            return hit
        covered = bytearray(len(text))
        digest = self._pseudo.phi_digest
        for n, ds in self._by_len.items():
            for i in range(len(text) - n + 1):
                if digest(text[i:i + n]) in ds:
                    covered[i:i + n] = b"\x01" * n
        if not any(covered):
            out = text
        else:
            parts: list[str] = []
            i = 0
            while i < len(text):
                if covered[i]:
                    while i < len(text) and covered[i]:
                        i += 1
                    parts.append(REDACTED)
                else:
                    j = i
                    while j < len(text) and not covered[j]:
                        j += 1
                    parts.append(text[i:j])
                    i = j
            out = "".join(parts)
        self._cache[text] = out
        return out
