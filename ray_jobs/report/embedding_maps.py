"""Pictures of what each encoder learned: a PCA map of the labelled embeddings and nearest neighbours
of a few labelled slices in the pre-training pool.

Tables of AUC say how well an encoder serves a classifier; these two pictures say *why*, in a way a
reader can check by eye:

* **PCA map** (``embedding_pca.png``): every labelled slice embedded by each frozen encoder (random
  initialisation included, for reference), projected on the first two principal components of that
  encoder's embeddings and coloured by class, one panel per encoder. Classes that separate here are
  separable by a linear probe; a collapsed encoder shows one point.
* **Nearest neighbours** (``embedding_nn_<encoder>.png``, one per encoder): a fixed, seeded handful of
  labelled slices (the same for every encoder) and, beside each, its most cosine-similar slices among
  a seeded subsample of the pre-training pool, drawn through a CT window, with the similarity under
  each. Good features retrieve anatomically similar slices; a random network retrieves by brightness.

Slices are embedded exactly as fine-tuning and the online probe read them: the encoder is resolved
like ``ctssl finetune --encoder`` (:func:`ray_jobs.finetune.encoders.resolve_encoders`), gets the
input windows fine-tuning gives it, and :func:`ssl_core.probe.embed` resizes, windows and embeds in
eval mode. The figures carry class names and similarities only: no patient id, slice id or any other
value of a slice's metadata is drawn.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are built in jobs and CI

import os

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from data_prep import shards

log = logging.getLogger(__name__)

PCA_FILE = "embedding_pca.png"
NN_PREFIX = "embedding_nn_"
SECTION = "What the encoders learned"
#: PNG metadata: no software version, so the same inputs give the same bytes
PNG_META = {"Software": None}
DPI = 90


@dataclass
class MapsInput:
    """What the maps need: the labelled set, the pool, and the encoders as fine-tuning names them."""

    labelled: str  # URL of the labelled prep output
    pool: str  # URL of the pre-training pool's prep output (a selection is read as its base)
    encoders: list[str]  # NAME=SOURCE values as ``ctssl finetune --encoder`` takes them; "random" included
    backbone: str | None = None  # the random baseline's network (None: the pre-trained encoders')
    tracking_uri: str = ""
    img_size: int | None = None  # None: the labelled slices' own size, as the study's fine-tuning uses
    seed: int = 0
    queries: int = 4
    neighbours: int = 4
    pool_slices: int = 512  # the demo's 768-slice pool: 512 keeps the maps under ~15 s on 2 CPU cores
    labelled_slices: int = 2000  # bound on the PCA map's points for large labelled sets
    #: reads the labelled set and the frozen encoders: (data with images/labels/classes, views with
    #: ``name``, ``embed(hu, img_size)`` and ``window()``). The caller hands in the fine-tuning code's
    #: loader (``ray_jobs.finetune.frozen_views.load_maps_data``), so the report never imports it.
    load: Callable[[MapsInput], tuple[Any, list[Any]]] | None = None


@dataclass
class MapsResult:
    files: list[str] = field(default_factory=list)  # the PNGs written
    markdown: str = ""  # the report section's body
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------ numbers
def pca_2d(emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) coordinates on the first two principal components and their shares of the variance.

    PCA rather than UMAP or t-SNE: it needs no new dependency, it is deterministic (same inputs, same
    picture, here with the sign of each axis fixed by its largest loading), and its linear structure is
    what a linear probe sees, so classes that separate on the map are linearly separable.
    """
    z = np.asarray(emb, dtype=np.float64)
    n = len(z)
    coords, share = np.zeros((n, 2)), np.zeros(2)
    if n < 2 or z.ndim != 2 or z.shape[1] == 0:
        return coords, share
    centred = z - z.mean(axis=0, keepdims=True)
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    total = float((s ** 2).sum())
    if not total > 1e-12 * n:  # a collapsed encoder: every slice at one point
        return coords, share
    m = min(2, len(s))
    signs = np.sign(vt[np.arange(m), np.abs(vt[:m]).argmax(axis=1)])
    signs[signs == 0] = 1.0
    coords[:, :m] = u[:, :m] * s[:m] * signs
    share[:m] = s[:m] ** 2 / total
    return coords, share


def nearest(queries: np.ndarray, bank: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, k) indices into ``bank`` of each query's ``k`` most cosine-similar rows, and the
    similarities, best first; ties go to the lower index, so a collapsed encoder gives a fixed answer."""
    q = np.asarray(queries, dtype=np.float64)
    b = np.asarray(bank, dtype=np.float64)
    qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    bn = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    sim = qn @ bn.T
    kk = min(k, b.shape[0])
    idx = np.argsort(-sim, axis=1, kind="stable")[:, :kk]
    return idx, np.take_along_axis(sim, idx, axis=1)


def pick_queries(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` seeded rows of the labelled set, taking the classes in turn so each class is shown."""
    rng = np.random.default_rng([seed, 0xE3B])
    by_class = [list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)]
    out: list[int] = []
    while len(out) < n and any(by_class):
        for members in by_class:
            if members and len(out) < n:
                out.append(int(members.pop(0)))
    return np.asarray(out, dtype=np.int64)


def stratified_rows(labels: np.ndarray, quota: int, seed: int) -> np.ndarray:
    """At most ``quota`` rows, sorted, each class keeping its share (for very large labelled sets)."""
    rows = np.arange(len(labels))
    if len(rows) <= quota:
        return rows
    rng = np.random.default_rng([seed, 0x9CA])
    keep = [rng.permutation(rows[labels == c])[:max(1, round(quota * (labels == c).mean()))]
            for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))


# ------------------------------------------------------------------------------------------ data
def read_pool_sample(url: str, n: int, seed: int, size: int | None = None) -> np.ndarray:
    """(<= n, H, W) int16 HU slices of the pool, drawn seeded and uniformly from its committed rows.

    The shard reader checks every shard it opens against the manifest; shards are visited in a
    seeded order and only until enough rows are drawn (at most 4 n rows' worth), so a pool of
    millions of slices costs a few shards' reads. A selection is read as its base output: the map
    shows what the pool holds, not what one reduction kept. Slices of another size than ``size``
    (default: the first shard's) are resized to it.
    """
    import torch
    import torch.nn.functional as F

    res = shards.resolve(url)
    rng = np.random.default_rng([seed, 0x9001])
    files = [res.files[i] for i in rng.permutation(len(res.files))]
    chosen, total = [], 0
    for f in files:
        if total >= 4 * n and chosen:
            break
        if int(f.get("rows", 0)) > 0:
            chosen.append(f)
            total += int(f["rows"])
    if total == 0:
        return np.zeros((0, size or 0, size or 0), np.int16)
    pick = np.sort(rng.choice(total, size=min(n, total), replace=False))
    out, start = [], 0
    for f in chosen:
        rows = int(f["rows"])
        local = pick[(pick >= start) & (pick < start + rows)] - start
        start += rows
        if not len(local):
            continue
        table = shards.read_shard(res.base_url, f, ["image", "height", "width"]).take(local)
        img = np.array(shards.decode_images(table), dtype=np.int16)
        size = size or img.shape[-1]
        if img.shape[-2:] != (size, size):
            t = F.interpolate(torch.from_numpy(img.astype(np.float32))[:, None], size=(size, size),
                              mode="bilinear", align_corners=False, antialias=True)
            img = t[:, 0].round().numpy().astype(np.int16)
        out.append(img)
    return np.concatenate(out) if out else np.zeros((0, size, size), np.int16)


# ------------------------------------------------------------------------------------------ pictures
def _colors(n: int) -> list:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def pca_figure(embeddings: dict[str, np.ndarray], labels: np.ndarray, classes: Sequence[str]) -> Figure:
    """One panel per encoder: the labelled slices on their first two principal components, by class."""
    names = list(embeddings)
    cols = min(len(names), 3)
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows + 0.5), dpi=DPI, squeeze=False)
    colors = _colors(len(classes))
    for ax, name in zip(axes.flat, names, strict=False):
        xy, share = pca_2d(embeddings[name])
        for c, cls in enumerate(classes):
            m = labels == c
            ax.scatter(xy[m, 0], xy[m, 1], s=9, alpha=0.7, lw=0, color=colors[c], label=str(cls))
        if not share.any():
            ax.text(0.5, 0.9, "collapsed: one point", transform=ax.transAxes, ha="center", fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(f"PC1 ({share[0]:.0%} of variance)", fontsize=8)
        ax.set_ylabel(f"PC2 ({share[1]:.0%})", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.yaxis.set_major_locator(MaxNLocator(5))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], ls="", marker="o", color=colors[c], label=str(cls))
               for c, cls in enumerate(classes)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(classes), 6), fontsize=8, title="class",
               title_fontsize=8, frameon=False)
    fig.suptitle("Labelled slices embedded by each frozen encoder (PCA)", fontsize=11)
    fig.tight_layout(rect=(0, 0.09 if rows == 1 else 0.05, 1, 1))
    return fig


def thumbnails(hu: np.ndarray, window) -> np.ndarray:  # noqa: ANN001 - a ct_window.WindowSpec
    """(N, H, W) float grey values in [0, 1] of HU slices through one CT window (no standardising)."""
    import torch

    from ssl_core.ct_window import apply_window

    x = torch.from_numpy(np.asarray(hu, dtype=np.float32))[:, None]
    return apply_window(x, [window], standardise=False)[:, 0].numpy()


def neighbours_figure(name: str, query_imgs: np.ndarray, query_classes: Sequence[str], pool_imgs: np.ndarray,
                      idx: np.ndarray, sim: np.ndarray) -> Figure:
    """One row per query: the query (framed, its class above it), then its nearest pool slices with
    their cosine similarity under each. Images are grey values in [0, 1], all of one size.

    The slices are laid out on one canvas drawn by one ``imshow`` rather than one axes per slice: a
    grid of 20-odd axes costs matplotlib more time than embedding the slices does."""
    from matplotlib.patches import Rectangle

    q, k = idx.shape
    h, w = query_imgs.shape[1:]
    gx, gy, sep = max(2, w // 12), max(4, h // 3), max(4, w // 4)
    canvas = np.full((q * h + (q + 1) * gy, (k + 1) * w + k * gx + sep), np.nan)
    cmap = plt.get_cmap("gray").with_extremes(bad="white")
    fig, ax = plt.subplots(figsize=(1.25 * (k + 1) + 0.3, 1.45 * q + 0.4), dpi=DPI)
    texts = []
    for r in range(q):
        y0 = gy + r * (h + gy)
        for c in range(k + 1):
            x0 = c * (w + gx) + (sep if c else 0)
            canvas[y0:y0 + h, x0:x0 + w] = query_imgs[r] if c == 0 else pool_imgs[idx[r, c - 1]]
            if c == 0:
                ax.add_patch(Rectangle((x0 - 1.5, y0 - 1.5), w + 2, h + 2, fill=False, ec="#c0392b", lw=1.5))
                texts.append((x0 + w / 2, y0 - 1.5, f"query: {query_classes[r]}", "bottom"))
            else:
                texts.append((x0 + w / 2, y0 + h + 0.5, f"{sim[r, c - 1]:.4f}", "top"))
    ax.imshow(canvas, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    for x, y, t, va in texts:
        ax.text(x, y, t, ha="center", va=va, fontsize=7)
    ax.axis("off")
    ax.set_title(f"{name}: nearest pool slices (cosine similarity)", fontsize=9)
    fig.tight_layout(pad=0.3)
    return fig


def save(fig: Figure, path: str) -> str:
    fig.savefig(path, format="png", metadata=PNG_META)
    plt.close(fig)
    return path


def file_name(encoder: str) -> str:
    """The neighbour picture's file name: the encoder's name with anything but ``[A-Za-z0-9._-]`` as ``_``."""
    return f"{NN_PREFIX}{re.sub(r'[^A-Za-z0-9._-]', '_', encoder)}.png"


NOTE = ("Each frozen encoder embeds the labelled slices as fine-tuning reads them. The first picture "
        "projects them on the first two principal components of each encoder's embeddings, coloured "
        "by class: classes that separate here are separable by a linear classifier on the frozen "
        "features; a collapsed encoder shows one point. The others show, per encoder, {q} labelled "
        "slices (the same for every encoder) and their {k} most cosine-similar slices among {p} "
        "slices drawn from the pre-training pool, with the similarity under each (values near 1 are "
        "usual: a CNN's pooled features share one dominant direction; the order is what counts).")


def write_maps(inp: MapsInput, out_dir: str) -> MapsResult:
    """Embed, draw and save the pictures into ``out_dir``; the result holds the section's markdown."""

    if inp.load is None:
        raise ValueError("MapsInput.load is unset: hand in ray_jobs.finetune.frozen_views.load_maps_data")
    t0 = time.perf_counter()
    data, views = inp.load(inp)
    img_size = inp.img_size or int(data.images.shape[-1])
    rows = stratified_rows(data.labels, inp.labelled_slices, inp.seed)
    pool = read_pool_sample(inp.pool, inp.pool_slices, inp.seed, size=int(data.images.shape[-1]))
    queries = pick_queries(data.labels, inp.queries, inp.seed)
    query_classes = [data.classes[c] for c in data.labels[queries]]
    lab_emb: dict[str, np.ndarray] = {}
    files = []
    for v in views:
        emb = v.embed(data.images[rows], img_size)
        lab_emb[v.name] = emb
        if len(pool) and len(queries):
            q_emb = v.embed(data.images[queries], img_size)
            idx, sim = nearest(q_emb, v.embed(pool, img_size), inp.neighbours)
            win = v.window()
            fig = neighbours_figure(v.name, thumbnails(data.images[queries], win), query_classes,
                                    thumbnails(pool, win), idx, sim)
            files.append(save(fig, os.path.join(out_dir, file_name(v.name))))
    pca = save(pca_figure(lab_emb, data.labels[rows], data.classes), os.path.join(out_dir, PCA_FILE))
    files.insert(0, pca)
    parts = [NOTE.format(q=len(queries), k=inp.neighbours, p=len(pool)),
             f"![Labelled slices embedded by each encoder (PCA)]({PCA_FILE})"]
    parts += [f"![Nearest pool slices: {v.name}]({file_name(v.name)})" for v in views
              if os.path.join(out_dir, file_name(v.name)) in files]
    dt = time.perf_counter() - t0
    log.info("embedding maps: %d encoders, %d labelled and %d pool slices in %.1f s", len(views), len(rows),
             len(pool), dt)
    return MapsResult(files=files, markdown="\n\n".join(parts), seconds=dt)


__all__ = ["MapsInput", "MapsResult", "SECTION", "nearest", "neighbours_figure", "pca_2d", "pca_figure",
           "pick_queries", "read_pool_sample", "write_maps"]
