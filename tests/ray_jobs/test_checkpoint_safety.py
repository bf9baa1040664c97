"""Checkpoints are data: a planted pickle runs no code, and a half-uploaded folder is never resumed from."""

from __future__ import annotations

import os

import pytest
import torch

from ray_jobs.pretrain import checkpoint as ckpt_io
from ray_jobs.pretrain.checkpoint_store import CheckpointStore


class _Planted:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _method():
    from ssl_core.methods import create_method

    torch.manual_seed(0)
    m = create_method("byol", backbone="test_resnet", img_size=32, hidden_dim=64, out_dim=32)
    return m, torch.optim.AdamW(m.parameters(), lr=1e-3)


def test_a_real_checkpoint_reads_back_as_plain_data(tmp_path):
    m, opt = _method()
    opt.step()  # optimizer state with tensors and numbers
    ckpt_io.save(str(tmp_path / "c"), method=m, optimizer=opt, progress=ckpt_io.Progress(step=3))
    m2, opt2 = _method()
    assert ckpt_io.load(str(tmp_path / "c"), method=m2, optimizer=opt2).step == 3
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values(), strict=True))


def test_a_planted_pickle_runs_no_code_and_is_refused_in_one_line(tmp_path):
    target = tmp_path / "pwned"
    d = tmp_path / "evil"
    d.mkdir()
    torch.save({"method": {}, "optimizer": {}, "torch_rng": _Planted(str(target))}, d / ckpt_io.STATE_FILE)
    with pytest.raises(ckpt_io.UnreadableCheckpoint, match="not a readable checkpoint") as e:
        ckpt_io.read_state(str(d))
    assert not target.exists()
    assert "\n" not in str(e.value)


def test_a_cut_short_checkpoint_is_not_complete_and_the_previous_one_is_resumed(tmp_path):
    m, opt = _method()
    store = CheckpointStore(str(tmp_path / "runs"), "exp")
    good = bad = None
    for step in (2, 4):
        local = str(tmp_path / f"local-{step}")
        ckpt_io.save(local, method=m, optimizer=opt, progress=ckpt_io.Progress(step=step))
        (good, bad) = (bad, store.save(local))
    state = os.path.join(bad, ckpt_io.STATE_FILE)
    with open(state, "r+b") as f:  # the upload of state.pt cut in half
        f.truncate(os.path.getsize(state) // 2)
    assert store.latest() == good and store.complete() == [good]
    assert store.older(bad) == [good]
    os.remove(os.path.join(good, ckpt_io.STATE_FILE))  # and a folder missing state.pt is not complete either
    assert store.latest() is None
    with pytest.raises(ckpt_io.UnreadableCheckpoint, match="state.pt: missing"):
        ckpt_io.read_state(good)
