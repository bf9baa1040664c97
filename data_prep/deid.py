"""Keyed pseudonyms for patient, study, series and slice identifiers.

A plain hash of a PatientID can be reversed by hashing a list of candidate IDs; an HMAC with a secret
key cannot, yet stays stable across runs (the same patient gets the same pseudonym in every shard,
which patient-level folds need). The key never leaves the machine that runs prep.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from data_prep.errors import UserError

KEY_ENV = "CTSSL_DEID_KEY"
_PREFIX = {"patient": "P", "study": "ST", "series": "SE", "slice": "SL", "task": "T"}


class Pseudonymizer:
    """HMAC-SHA256 pseudonyms, one namespace per identifier kind."""

    def __init__(self, key: bytes):
        if len(key) < 16:
            raise UserError("de-identification key is too short (need at least 16 bytes)")
        self._key = key

    def __call__(self, kind: str, value: str) -> str:
        prefix = _PREFIX.get(kind, kind[:2].upper())
        mac = hmac.new(self._key, f"{kind}\x00{value}".encode(), hashlib.sha256).hexdigest()
        return f"{prefix}-{mac[:20]}"

    def fingerprint(self) -> str:
        """A short id of the key (not the key) so a manifest can tell which key made it."""
        return hmac.new(self._key, b"ctssl-key-fingerprint", hashlib.sha256).hexdigest()[:12]


def load_key(key_file: str | None = None, *, allow_generate: bool = False,
             generated_path: str | None = None) -> bytes:
    """The key from ``key_file``, else ``$CTSSL_DEID_KEY``; a clear error when neither is set.

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
        return key
    env = os.environ.get(KEY_ENV, "").strip()
    if env:
        return env.encode()
    if allow_generate and generated_path:
        gp = Path(generated_path)
        if gp.is_file():
            return gp.read_bytes().strip()
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


def redact(text: str, phi: list[str] | set[str]) -> str:
    """``text`` with every identifying value in ``phi`` replaced by ``[redacted]``.

    Used on input paths in reject lists and logs: folders are often named by PatientID (LIDC-IDRI)
    and files by SOPInstanceUID, so a path alone can identify a patient. The rest of the path stays,
    so a person can still find the file.
    """
    for v in sorted({v for v in phi if len(v) >= 3}, key=len, reverse=True):
        if v in text:
            text = text.replace(v, "[redacted]")
    return text
