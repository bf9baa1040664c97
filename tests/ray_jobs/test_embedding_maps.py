"""The report's embedding maps: a PCA panel per encoder coloured by class, nearest pool neighbours that
are the true cosine nearest, no crash on a collapsed encoder, and no identifying text in any figure."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.text import Text
from torch import nn

from data_prep import shards
from ray_jobs import tracking
from ray_jobs.finetune.frozen_views import EncoderView, load_maps_data
from ray_jobs.finetune.trial import trial_tags
from ray_jobs.report import embedding_maps as em
from ray_jobs.report.build import ReportConfig, build_report
from ray_jobs.trial_record import SizeSpec
from ssl_core.backbones import create_backbone, export_encoder_state_dict
from tests.ray_jobs.tiny_data import write_tiny_dataset


def _texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    root = tmp_path_factory.mktemp("maps")
    labelled, pool = str(root / "labelled"), str(root / "pool")
    write_tiny_dataset(labelled, patients=8, slices=6, size=32, source="lab")
    write_tiny_dataset(pool, patients=10, slices=6, size=32, source="pool", seed=3, shards_count=3, labelled=False)
    ckpt = root / "ckpt"
    ckpt.mkdir()
    torch.manual_seed(1)
    torch.save(export_encoder_state_dict(create_backbone("resnet18", in_chans=1)), ckpt / "encoder.pt")
    (ckpt / "encoder_config.json").write_text(json.dumps({"backbone": "resnet18", "in_chans": 1,
                                                          "method": "simclr"}))
    texts: dict[str, list[str]] = {}
    real_save = em.save

    def recording_save(fig, path):
        texts[path] = _texts(fig)
        return real_save(fig, path)

    out = root / "report"
    out.mkdir()
    em.save = recording_save
    try:
        res = em.write_maps(em.MapsInput(labelled=labelled, pool=pool, encoders=["random", f"simclr={ckpt}"],
                                         seed=5, pool_slices=40, load=load_maps_data), str(out))
    finally:
        em.save = real_save
    ids = shards.read_table(labelled, columns=["patient_id", "slice_id", "series_id", "study_id"]).to_pydict()
    ids.update({f"pool_{k}": v for k, v in shards.read_table(pool, columns=["patient_id", "slice_id"])
                .to_pydict().items()})
    inputs = {"labelled": labelled, "pool": pool, "encoders": ["random", f"simclr={ckpt}"],
              "load": load_maps_data}
    return res, out, texts, ids, inputs


def _mlflow_study(uri: str, experiment: str) -> None:
    """The smallest study a report reads: one finished trial of each encoder."""
    cl = tracking.client(uri)
    exp = cl.create_experiment(experiment)
    parent = cl.create_run(exp, tags={tracking.TAG_KIND: "study"}).info.run_id
    for enc, auc in (("random", 0.5), ("simclr", 0.7)):
        run = cl.create_run(exp, tags=trial_tags(enc, enc, SizeSpec("per_class", -1), 0, 0, parent)).info.run_id
        cl.log_metric(run, "test_auc", auc)
        cl.log_metric(run, "train_per_class_min", 24)
        cl.set_terminated(run, status="FINISHED")
    cl.set_terminated(parent, status="FINISHED")


def test_pngs_written_and_named_in_the_markdown(maps):
    res, out, texts, _, _ = maps
    names = sorted(p.name for p in out.iterdir())
    assert names == ["embedding_nn_random.png", "embedding_nn_simclr.png", "embedding_pca.png"]
    for p in out.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for n in names:
        assert f"]({n})" in res.markdown
    assert "4 labelled slices" in res.markdown and "40 slices drawn from the pre-training pool" in res.markdown
    pca = texts[str(out / "embedding_pca.png")]
    assert "random" in pca and "simclr" in pca and "disk" in pca and "square" in pca
    nn_texts = texts[str(out / "embedding_nn_simclr.png")]
    assert sum(t.startswith("query: ") for t in nn_texts) == 4
    sims = [float(t) for t in nn_texts if re.fullmatch(r"-?\d\.\d{4}", t)]
    assert len(sims) == 16 and all(-1.0 <= s <= 1.0 + 1e-6 for s in sims)


def test_nothing_identifying_in_any_figure(maps):
    _, out, texts, ids, _ = maps
    values = {str(v) for col in ids.values() for v in col}
    assert values
    for path, words in texts.items():
        joined = "\n".join(words)
        assert not [v for v in values if v in joined], path
        assert "patient" not in joined.lower()
    for p in out.iterdir():  # nor in the PNG's metadata
        raw = p.read_bytes()
        assert not [v for v in values if v.encode() in raw], p.name


def test_pca_panels_one_per_encoder_coloured_by_class():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [5, 7, 9])
    emb = {f"enc{i}": rng.normal(size=(len(labels), 16)) + labels[:, None] for i in range(4)}
    fig = em.pca_figure(emb, labels, ["a", "b", "c"])
    panels = [ax for ax in fig.axes if ax.collections]
    assert [ax.get_title() for ax in panels] == ["enc0", "enc1", "enc2", "enc3"]
    for ax in panels:
        colors = [tuple(c.get_facecolor()[0][:3]) for c in ax.collections]
        assert len(set(colors)) == 3  # one colour per class ...
        assert [len(c.get_offsets()) for c in ax.collections] == [5, 7, 9]  # ... holding that class's slices
        assert [c.get_label() for c in ax.collections] == ["a", "b", "c"]
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["a", "b", "c"]
    matplotlib.pyplot.close(fig)


def test_pca_matches_the_principal_axes():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(50, 6)) * np.array([5.0, 2.0, 0.5, 0.1, 0.1, 0.1])
    xy, share = em.pca_2d(z)
    cov = np.cov(z - z.mean(0), rowvar=False)
    evals = np.sort(np.linalg.eigvalsh(cov))[::-1]
    np.testing.assert_allclose(xy.var(0, ddof=1), evals[:2], rtol=1e-9)
    np.testing.assert_allclose(share, evals[:2] / evals.sum(), rtol=1e-9)
    np.testing.assert_allclose(em.pca_2d(z)[0], xy)  # deterministic, signs included


def test_nearest_is_the_brute_force_cosine_nearest():
    rng = np.random.default_rng(2)
    q, bank = rng.normal(size=(6, 8)), rng.normal(size=(30, 8)) * rng.uniform(0.1, 5, (30, 1))
    idx, sim = em.nearest(q, bank, 4)
    for i in range(len(q)):
        cos = [float(q[i] @ b / np.linalg.norm(q[i]) / np.linalg.norm(b)) for b in bank]
        order = sorted(range(len(bank)), key=lambda j: -cos[j])[:4]
        assert idx[i].tolist() == order
        np.testing.assert_allclose(sim[i], [cos[j] for j in order], rtol=1e-12)


class _Constant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v.expand(len(x), -1)


def test_collapsed_encoder_draws_without_crashing(tmp_path):
    rng = np.random.default_rng(3)
    hu = rng.integers(-1000, 400, size=(12, 16, 16)).astype(np.int16)
    view = EncoderView("collapsed", _Constant(), None, 1)
    emb = view.embed(hu, 16)
    assert np.allclose(emb, emb[0])
    xy, share = em.pca_2d(emb)
    assert not xy.any() and not share.any()
    labels = np.arange(12) % 2
    fig = em.pca_figure({"collapsed": emb}, labels, ["x", "y"])
    assert "collapsed: one point" in _texts(fig)
    em.save(fig, str(tmp_path / "pca.png"))
    idx, sim = em.nearest(emb[:3], emb, 4)
    assert idx.tolist() == [[0, 1, 2, 3]] * 3 and np.allclose(sim, 1.0)
    win = view.window()
    fig = em.neighbours_figure("collapsed", em.thumbnails(hu[:3], win), ["x", "y", "x"], em.thumbnails(hu, win),
                               idx, sim)
    em.save(fig, str(tmp_path / "nn.png"))
    assert (tmp_path / "nn.png").stat().st_size > 0 and (tmp_path / "pca.png").stat().st_size > 0


def test_pick_queries_seeded_and_covering_classes():
    labels = np.array([0] * 10 + [1] * 3)
    a = em.pick_queries(labels, 4, seed=7)
    assert a.tolist() == em.pick_queries(labels, 4, seed=7).tolist()
    assert len(set(a.tolist())) == 4 and set(labels[a].tolist()) == {0, 1}


def test_pool_sample_is_seeded_and_bounded(tmp_path):
    url = str(tmp_path / "pool")
    write_tiny_dataset(url, patients=4, slices=5, size=24, shards_count=4, labelled=False)
    a = em.read_pool_sample(url, 7, seed=1)
    assert a.shape == (7, 24, 24) and a.dtype == np.int16
    np.testing.assert_array_equal(a, em.read_pool_sample(url, 7, seed=1))
    everything = shards.decode_images(shards.read_table(url, columns=["image", "height", "width"]))
    assert all(any(np.array_equal(s, e) for e in everything) for s in a)
    assert em.read_pool_sample(url, 100, seed=1).shape[0] == 20
    assert em.read_pool_sample(url, 5, seed=1, size=16).shape == (5, 16, 16)


def test_report_embeds_the_maps_under_their_heading_and_survives_a_broken_source(maps, tmp_path):
    inputs = maps[-1]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _mlflow_study(uri, "maps-study")
    paths = build_report(ReportConfig(experiment="maps-study", out=str(tmp_path / "r"), tracking_uri=uri,
                                      embedding_maps=em.MapsInput(**inputs, pool_slices=16)))
    md = (tmp_path / "r" / "report.md").read_text()
    section = md.split("## What the encoders learned\n\n")[1].split("\n## ")[0]
    for name in ("embedding_pca.png", "embedding_nn_random.png", "embedding_nn_simclr.png"):
        assert f"]({name})" in section and (tmp_path / "r" / name).is_file()
    page = Path(paths.html).read_text()
    assert "<h2>What the encoders learned</h2>" in page
    assert page.split("<h2>What the encoders learned</h2>")[1].split("<h2>")[0].count("data:image/png;base64,") == 3

    broken = em.MapsInput(**{**inputs, "pool": str(tmp_path / "no-pool")})
    build_report(ReportConfig(experiment="maps-study", out=str(tmp_path / "b"), tracking_uri=uri,
                              embedding_maps=broken))
    md = (tmp_path / "b" / "report.md").read_text()
    assert "## What the encoders learned\n\nNot drawn: " in md and "no-pool" in md
    assert not list((tmp_path / "b").glob("embedding_*.png"))
    build_report(ReportConfig(experiment="maps-study", out=str(tmp_path / "n"), tracking_uri=uri))
    assert "What the encoders learned" not in (tmp_path / "n" / "report.md").read_text()


def test_cli_report_draws_the_maps_its_flags_name(maps, tmp_path, capsys):
    from ray_jobs.cli import main

    inputs = maps[-1]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _mlflow_study(uri, "cli-maps")
    base = ["report", "--experiment", "cli-maps", "--tracking-uri", uri, "--out", str(tmp_path / "r")]
    assert main([*base, "--maps-data", inputs["labelled"]]) != 0
    assert "--maps-data needs --maps-pool" in capsys.readouterr().err
    assert main([*base, "--maps-data", inputs["labelled"], "--maps-pool", inputs["pool"],
                 "--maps-encoder", inputs["encoders"][1], "--maps-encoder", "random"]) == 0
    assert sorted(p.name for p in (tmp_path / "r").glob("embedding_*.png")) == [
        "embedding_nn_random.png", "embedding_nn_simclr.png", "embedding_pca.png"]
    assert "## What the encoders learned" in (tmp_path / "r" / "report.md").read_text()


@pytest.mark.parametrize("switch", ["", "report: {embeddingMaps: false}"])
def test_the_study_report_stage_maps_every_pretrained_encoder_unless_switched_off(tmp_path, switch):
    from ray_jobs.study import spec
    from ray_jobs.study.stages import Context, _maps_input

    study = spec.loads(f"""\
apiVersion: ctssl/v1
kind: Study
metadata: {{name: maps}}
spec:
  storage: {tmp_path / 'store'}
  data:
    pretrain: {{type: shards, path: {tmp_path / 'pool'}}}
    labelled: {{type: shards, path: {tmp_path / 'labelled'}}}
  pretrain: {{methods: {{byol: {{}}, spark: {{}}}}}}
  finetune: {{backbone: resnet18}}
  {switch}
""", "s.yaml")
    results = {f"pretrain-{m}": {"encoder": m, "checkpoint": f"/ckpt/{m}"} for m in ("byol", "spark")}
    got = _maps_input(Context(study=study, address=None, tracking_uri="sqlite:///x.db", results=results))
    if switch:
        assert got is None
        return
    assert got.encoders == ["random", "byol=/ckpt/byol", "spark=/ckpt/spark"]
    assert (got.labelled, got.pool) == (str(tmp_path / "labelled"), str(tmp_path / "pool"))
    assert got.backbone == "resnet18" and got.seed == study.spec["seed"]
