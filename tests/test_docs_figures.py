"""docs/make_figures.py draws the pictures the docs embed: each function writes a valid PNG of a
sensible size, and the committed pictures are the ones the docs link to."""

from __future__ import annotations

import importlib.util
import re
import struct
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "docs" / "make_figures.py"
MAX_BYTES = 300 * 1024


@pytest.fixture(scope="module")
def figures():
    spec = importlib.util.spec_from_file_location("ctssl_docs_make_figures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, after checking its signature and that it ends with IEND."""
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name}: not a PNG"
    assert raw[12:16] == b"IHDR", f"{path.name}: no IHDR chunk first"
    assert raw[-12:-4] == b"\x00\x00\x00\x00IEND", f"{path.name}: truncated (no IEND chunk at the end)"
    return struct.unpack(">II", raw[16:24])


def check_png(path: Path) -> None:
    assert path.is_file(), f"{path} was not written"
    size = path.stat().st_size
    assert 5 * 1024 < size < MAX_BYTES, f"{path.name}: {size} bytes (expected 5 KB .. 300 KB)"
    width, height = png_size(path)
    assert 300 <= width <= 2000 and 200 <= height <= 2000, f"{path.name}: {width}x{height} px"


def test_stage_flow(figures, tmp_path):
    check_png(figures.stage_flow(tmp_path))


def test_phantom_slices(figures, tmp_path):
    check_png(figures.phantom_slices(tmp_path))


def test_reduction_examples(figures, tmp_path):
    path, counts = figures.reduction_examples(tmp_path)
    check_png(path)
    assert 0 < counts["kept"] < counts["slices"]  # the example shows removed slices


def test_main_draws_one_figure_on_request(figures, tmp_path, capsys):
    assert figures.main(["--out", str(tmp_path), "--only", "stage-flow"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["stage-flow.png"]
    assert "stage-flow.png" in capsys.readouterr().out


def test_committed_pictures_are_small_pngs_and_every_link_resolves():
    docs = REPO / "docs"
    for png in sorted((docs / "img").glob("*.png")):
        check_png(png)
    for name in ("stage-flow.png", "phantom-slices.png", "reduction-examples.png"):
        assert (docs / "img" / name).is_file(), f"docs/img/{name} missing: run docs/make_figures.py"
    for md in sorted(docs.glob("*.md")):
        for target in re.findall(r"!\[[^\]]*\]\((img/[^)\s]+)\)", md.read_text()):
            assert (docs / target).is_file(), f"{md.name} links to {target}, which does not exist"
