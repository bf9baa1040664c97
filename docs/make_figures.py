"""Draw the pictures in docs/img/ from ctssl's own code.

Regenerate all of them (a few seconds, CPU only, nothing downloaded):

    .venv/bin/python docs/make_figures.py            # writes docs/img/*.png
    .venv/bin/python docs/make_figures.py --out DIR  # somewhere else

Figures:

* ``stage-flow.png``: the stages of a ctssl study, from CT files to the report and MLflow.
* ``phantom-slices.png``: slices of one synthetic phantom patient (``data_prep.phantom``) through
  the three CT windows a 3-channel model reads (``ssl_core.ct_window``).
* ``reduction-examples.png``: the examples picture ``ctssl reduce --strategy hash`` writes into its
  report (``data_prep.reduce.report.render_examples_png``), for one phantom series.

Every figure is deterministic (fixed seeds); ``tests/test_docs_figures.py`` runs these functions.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

IMG_DIR = REPO / "docs" / "img"
DPI = 80
#: metadata written into every PNG: no software version or date, so a rerun gives the same bytes
PNG_META = {"Software": None}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI, metadata=PNG_META)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- (a) the stage flow

_STAGE = "#dbe9f6"  # a ctssl command
_DATA = "#f3f3f3"  # data at rest
_STORE = "#fbe7c6"  # MLflow


def stage_flow(out_dir: Path = IMG_DIR) -> Path:
    """``stage-flow.png``: CT files -> prep -> shards -> (reduce) -> pretrain -> finetune -> report."""
    plt = _pyplot()
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    fig, ax = plt.subplots(figsize=(12.5, 5.6))
    ax.set_xlim(-0.6, 5.6)
    ax.set_ylim(-1.75, 1.75)
    ax.axis("off")
    w, h = 0.9, 0.78

    def box(x: float, y: float, title: str, body: str, color: str, width: float = w) -> None:
        ax.add_patch(FancyBboxPatch((x - width / 2, y - h / 2), width, h, boxstyle="round,pad=0.02,rounding_size=0.06",
                                    fc=color, ec="#4a4a4a", lw=1.0))
        ax.text(x, y + h / 2 - 0.1, title, ha="center", va="top", fontsize=9.5, weight="bold")
        ax.text(x, y + h / 2 - 0.3, body, ha="center", va="top", fontsize=8, linespacing=1.35)

    def arrow(a: tuple[float, float], b: tuple[float, float], label: str = "", rad: float = 0.0,
              dy: float = 0.07) -> None:
        ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=13, lw=1.2, color="#333333",
                                     connectionstyle=f"arc3,rad={rad}", shrinkA=0, shrinkB=0))
        if label:
            ax.text((a[0] + b[0]) / 2, (a[1] + b[1]) / 2 + dy, label, ha="center", va="bottom", fontsize=7.5,
                    style="italic", color="#333333")

    top, bottom = 0.75, -0.55
    r = w / 2
    # unlabelled CT -> pre-training
    box(0, top, "CT files", "DICOM series\nNIfTI, MedMNIST .npz\nPNG / JPEG folders\n(folder or s3://)", _DATA)
    box(1, top, "ctssl prep", "de-identify (pseudonyms)\nHU, resize to 256 px\ndhash per slice\nRay tasks or k8s Job",
        _STAGE)
    box(2, top, "Parquet shards", "one row per slice\nint16 HU, zstd\n_manifest.json\n(commit marker)", _DATA)
    box(3, top, "ctssl reduce", "optional: drop\nnear-duplicate slices\n(hash, ssim, ...)\nselection manifest", _STAGE)
    box(4.1, top, "ctssl pretrain", "Ray Train, one run\nper method:\nBYOL, MoCo v2,\nSwAV, SparK", _STAGE, width=1.0)
    arrow((r, top), (1 - r, top))
    arrow((1 + r, top), (2 - r, top))
    arrow((2 + r, top), (3 - r, top))
    arrow((3 + r, top), (4.1 - 0.5, top), "selection")
    arrow((2, top + h / 2), (4.1, top + h / 2), "or every slice", rad=-0.35, dy=0.3)

    # labelled CT -> study -> report
    box(0, bottom, "labelled images", "the same formats\n+ labels.csv\n(patient column\nfor folds)", _DATA)
    box(1, bottom, "ctssl prep", "--labels\nsame shards,\nwith a label column", _STAGE)
    box(2, bottom, "labelled shards", "one row per slice\n+ label, patient\npseudonym", _DATA)
    box(4.1, bottom, "ctssl finetune",
        "Ray Tune: every encoder\n(+ random init) x\nlabelled sizes x folds,\nrecipe tuned on validation",
        _STAGE, width=1.0)
    box(5.2, bottom, "ctssl report", "AUC vs size, tests\nvs random, verdict\nreport.md / .html", _STAGE, width=0.75)
    arrow((r, bottom), (1 - r, bottom))
    arrow((1 + r, bottom), (2 - r, bottom))
    arrow((2 + r, bottom), (4.1 - 0.5, bottom))
    arrow((4.1, top - h / 2), (4.1, bottom + h / 2), "encoders", dy=-0.04)

    # MLflow under the study and the report
    ax.add_patch(FancyBboxPatch((2.6, -1.66), 2.9, 0.46, boxstyle="round,pad=0.02,rounding_size=0.06",
                                fc=_STORE, ec="#4a4a4a", lw=1.0))
    ax.text(4.05, -1.43, "MLflow (SQLite file or server): a run per reduction, per pre-training\n"
            "and per fine-tuning trial: params, metrics, encoders, reports", ha="center", va="center",
            fontsize=8, linespacing=1.35)
    arrow((4.1, bottom - h / 2), (4.1, -1.22))
    arrow((5.2, -1.22), (5.2, bottom - h / 2), "reads", dy=0.0)
    for i, (c, name) in enumerate(((_STAGE, "ctssl command"), (_DATA, "data"), (_STORE, "tracking"))):
        y = 1.0 - 0.2 * i
        ax.add_patch(FancyBboxPatch((4.9, y - 0.06), 0.1, 0.12, boxstyle="square,pad=0", fc=c, ec="#4a4a4a"))
        ax.text(5.05, y, name, fontsize=8, va="center")
    fig.tight_layout(pad=0.2)
    return _save(fig, Path(out_dir) / "stage-flow.png")


# --------------------------------------------------------------------------- (b) phantom slices

PHANTOM_SEED = 0  # cohort seed (`ctssl phantom --seed 0`), patient 0
PHANTOM_SLICES = 96  # slices of the series the shown slices are taken from
PHANTOM_SIZE = 256  # `ctssl phantom`'s default --size
PHANTOM_REGIONS = ("lung", "heart", "liver", "kidney", "bowel", "pelvis")


def _phantom_picks(plan) -> list[int]:
    """One slice per region: the middle of the region, or its first slice with a lesion."""
    picks = []
    for region in PHANTOM_REGIONS:
        idx = np.flatnonzero(plan.region == region)
        if idx.size == 0:
            continue
        with_lesion = idx[plan.lesion[idx]]
        picks.append(int(with_lesion[len(with_lesion) // 2]) if region == "lung" and with_lesion.size
                     else int(idx[idx.size // 2]))
    return picks


def phantom_slices(out_dir: Path = IMG_DIR) -> Path:
    """``phantom-slices.png``: one slice per region of phantom patient 0, in ctssl's three CT windows."""
    import torch

    from data_prep.phantom.synth import PhantomPatient, patient_seed
    from ssl_core.ct_window import WINDOW_PRESETS, apply_window, default_windows

    plt = _pyplot()
    plan = PhantomPatient(patient_seed(PHANTOM_SEED, 0), PHANTOM_SLICES, PHANTOM_SIZE)
    picks = _phantom_picks(plan)
    hu = np.stack([plan.render(i) for i in picks])
    windows = default_windows(3)
    with torch.no_grad():
        shown = apply_window(torch.from_numpy(hu)[:, None], windows).numpy()  # (n, 3, H, W) in [0, 1]
    fig, axes = plt.subplots(len(windows), len(picks), figsize=(1.55 * len(picks) + 0.5, 1.62 * len(windows) + 0.35),
                             squeeze=False)
    for c, i in enumerate(picks):
        lesion = " (lesion)" if plan.lesion[i] else ""
        axes[0, c].set_title(f"{plan.region[i]}{lesion}\nslice {i + 1} of {PHANTOM_SLICES}", fontsize=8)
        for r, win in enumerate(windows):
            ax = axes[r, c]
            ax.imshow(shown[c, r], cmap="gray", vmin=0.0, vmax=1.0, interpolation="antialiased")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                center, width = WINDOW_PRESETS[win]
                ax.set_ylabel(f"{win.replace('_', ' ')}\nC {center:g} / W {width:g}", fontsize=8)
    fig.suptitle(f"Synthetic phantom, one patient ({PHANTOM_SIZE} px, seed {PHANTOM_SEED}): "
                 "one slice per region label, in the three CT windows of a 3-channel model", fontsize=8.5)
    fig.tight_layout(pad=0.3, h_pad=0.2, w_pad=0.2, rect=(0, 0, 1, 0.94))
    return _save(fig, Path(out_dir) / "phantom-slices.png")


# --------------------------------------------------------------------------- (c) reduction examples

REDUCE_SLICES = 48  # one phantom series
REDUCE_SIZE = 128
REDUCE_THRESHOLD = 6  # the paper's (and ctssl's default) maximum Hamming distance
REDUCE_EXAMPLES = 4


def reduction_examples(out_dir: Path = IMG_DIR) -> tuple[Path, dict]:
    """``reduction-examples.png``: ``ctssl reduce --strategy hash``'s own examples picture for one
    phantom series; also returns the kept count, so the docs can quote it."""
    from data_prep.dhash import dhash64_hu
    from data_prep.phantom.synth import PhantomPatient, patient_seed
    from data_prep.reduce.base import SliceSet
    from data_prep.reduce.hashing import HashStrategy
    from data_prep.reduce.report import example_pairs, render_examples_png

    plan = PhantomPatient(patient_seed(PHANTOM_SEED, 0), REDUCE_SLICES, REDUCE_SIZE)
    hu = np.stack([plan.render(i) for i in range(REDUCE_SLICES)])
    data = SliceSet(slice_id=np.array([f"s{i}" for i in range(REDUCE_SLICES)], dtype=object),
                    series=np.zeros(REDUCE_SLICES, np.int64), series_name=["patient-0"],
                    slice_index=np.arange(REDUCE_SLICES),
                    dhash=dhash64_hu(hu, compiled=False),  # prep stores these in the `dhash` column
                    load_pixels=lambda idx: hu[np.asarray(idx)])
    strategy = HashStrategy(scope="volume")
    strategy.prepare(data)
    sel = strategy.select(REDUCE_THRESHOLD)
    png = render_examples_png(data, sel, example_pairs(sel, REDUCE_EXAMPLES), "hash, Hamming distance <= 6")
    path = Path(out_dir) / "reduction-examples.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_strip_png_text(png))
    return path, {"slices": REDUCE_SLICES, "kept": sel.kept}


def _strip_png_text(png: bytes) -> bytes:
    """Drop tEXt/iTXt/zTXt chunks (matplotlib's version string), so reruns give the same bytes."""
    out, pos = io.BytesIO(), 8
    out.write(png[:8])
    while pos < len(png):
        length = int.from_bytes(png[pos:pos + 4], "big")
        end = pos + 12 + length
        if png[pos + 4:pos + 8] not in (b"tEXt", b"iTXt", b"zTXt"):
            out.write(png[pos:end])
        pos = end
    return out.getvalue()


FIGURES = {"stage-flow": stage_flow, "phantom-slices": phantom_slices, "reduction-examples": reduction_examples}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=IMG_DIR, help="folder for the PNG files (default: docs/img)")
    ap.add_argument("--only", choices=sorted(FIGURES), action="append", help="draw only this figure (repeatable)")
    args = ap.parse_args(argv)
    for name in args.only or FIGURES:
        result = FIGURES[name](args.out)
        path = result[0] if isinstance(result, tuple) else result
        extra = f"  {result[1]}" if isinstance(result, tuple) else ""
        print(f"{path}  {path.stat().st_size / 1024:.0f} KB{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
