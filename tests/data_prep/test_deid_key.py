"""The de-identification key: weak keys are refused in one line naming where the key came from, and
outputs record the key only as a salted slow hash that still refuses a resume with another key."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctssl_base.errors import UserError
from data_prep import shards
from data_prep.deid import KEY_ENV, Pseudonymizer, key_weakness, load_key
from data_prep.prep import PrepConfig, run_prep
from ray_jobs.cli import main
from tests.conftest import TEST_DEID_KEY

HINT = "generate one with `python -c 'import secrets; print(secrets.token_hex(32))'`"
WEAK = [
    (b"a" * 16, "16 bytes, need at least 32"),
    (b"ctssl-test-key-0123456789abcdef", "31 bytes, need at least 32"),
    (b"a" * 40, "only 1 distinct byte value(s), need at least 8"),
    (b"password" * 4, "only 7 distinct byte value(s), need at least 8"),
    (b"bench-real-" + b"k" * 40, "low entropy (1.4 bits per byte, need at least 2.5)"),
    (b"0123456789abcdef" * 2, "a 16-character block repeated"),
    (b"Passw0rd!" * 4, "a 9-character block repeated"),
    (b"abcdefghijklmnopqrstuvwxyz012345", "mostly a run of consecutive characters"),
]


def _images(root: Path) -> Path:
    """A tiny image folder: two grey PNGs (the imagefolder source needs no header parsing)."""
    root.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((8, 8), 40 * (i + 1), np.uint8)).save(root / f"img{i}.png")
    return root


@pytest.mark.parametrize(("key", "why"), WEAK)
def test_weak_keys_are_refused_with_the_reason(key: bytes, why: str) -> None:
    assert key_weakness(key) == why
    with pytest.raises(UserError, match="de-identification key from the caller is too weak"):
        Pseudonymizer(key)


def test_random_and_test_keys_pass() -> None:
    for _ in range(200):
        for key in (secrets.token_hex(16), secrets.token_hex(32), secrets.token_urlsafe(32)):
            assert key_weakness(key.encode()) is None, key
        assert key_weakness(secrets.token_bytes(32)) is None
    assert key_weakness(TEST_DEID_KEY.encode()) is None


def test_a_short_key_in_the_environment_fails_in_one_line_naming_the_variable(tmp_path, capsys, monkeypatch):
    src = _images(tmp_path / "src")
    monkeypatch.setenv(KEY_ENV, "a" * 16)
    rc = main(["prep", str(src), str(tmp_path / "out"), "--executor", "local", "--no-progress"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2
    assert err == [f"ctssl prep: error: de-identification key from ${KEY_ENV} is too weak: "
                   f"16 bytes, need at least 32; {HINT}"]
    assert not (tmp_path / "out").exists()


def test_a_weak_key_file_fails_in_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    src = _images(tmp_path / "src")
    key_file = tmp_path / "deid.key"
    key_file.write_text("password" * 4 + "\n")
    monkeypatch.delenv(KEY_ENV, raising=False)
    rc = main(["prep", str(src), str(tmp_path / "out"), "--executor", "local", "--no-progress",
               "--deid-key-file", str(key_file)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2
    assert err == [f"ctssl prep: error: de-identification key from {key_file} is too weak: "
                   f"only 7 distinct byte value(s), need at least 8; {HINT}"]


def test_the_demo_generates_a_valid_key_and_reuses_it(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    path = tmp_path / "demo" / "deid.key"
    key = load_key(None, allow_generate=True, generated_path=str(path))
    assert key_weakness(key) is None and path.stat().st_mode & 0o777 == 0o600
    assert load_key(None, allow_generate=True, generated_path=str(path)) == key


def test_outputs_hold_a_slow_salted_key_check_not_a_fast_fingerprint(tmp_path):
    src, out = _images(tmp_path / "src"), tmp_path / "out"
    key = TEST_DEID_KEY.encode()
    run_prep(PrepConfig(src=str(src), dst=str(out), size=8, executor="local", progress=False), key)
    config = shards.read_manifest(str(out))["config"]
    assert "deid_key_fingerprint" not in config
    check = config["deid_key_check"]
    assert check["kdf"] == "scrypt" and check["n"] >= 2**14 and check["r"] >= 8 and len(check["salt"]) == 32
    # whoever holds the key (and only they) can confirm it made this output, at scrypt's cost
    assert hashlib.scrypt(key, salt=bytes.fromhex(check["salt"]), n=check["n"], r=check["r"], p=check["p"],
                          maxmem=2**26, dklen=32).hex() == check["hash"]
    # the old 48-bit HMAC fingerprint (one fast hash per guessed key) appears in no file of the output
    old = hmac.new(key, b"ctssl-key-fingerprint", hashlib.sha256).hexdigest()[:12]
    for f in out.rglob("*"):
        if f.is_file():
            assert old.encode() not in f.read_bytes(), f
    commits = [json.loads(f.read_text()) for f in (out / "_commits").glob("*.json")]
    assert commits and all(c["fingerprint"] == config["fingerprint"] for c in commits)


def test_a_resume_with_another_key_is_refused_and_with_the_same_key_continues(tmp_path):
    src, out = _images(tmp_path / "src"), tmp_path / "out"
    cfg = {"src": str(src), "dst": str(out), "size": 8, "executor": "local", "progress": False}
    first = run_prep(PrepConfig(**cfg), TEST_DEID_KEY.encode())
    assert first.committed
    with pytest.raises(UserError, match="made with other settings .* de-identification key differ"):
        run_prep(PrepConfig(**cfg), secrets.token_hex(32).encode())
    again = run_prep(PrepConfig(**cfg), TEST_DEID_KEY.encode())
    assert again.committed and again.resumed_series > 0 and again.slices_written == first.slices_written
