"""``ctssl reduce`` end to end: a prep output in, a committed selection + report (+ MLflow run) out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_prep import shards
from data_prep.dhash import dhash64_hu, hamming
from data_prep.phantom.synth import render_volume
from ray_jobs.cli import main

N_SERIES, N_SLICES, SIZE = 3, 24, 64


def write_prep_output(url: str, n_series: int = N_SERIES, n_slices: int = N_SLICES) -> dict[str, np.ndarray]:
    """A committed prep output of phantom volumes (two shards, series split across them, slices of
    the first series written in reverse so that the reducer must sort by slice_index)."""
    cols: dict[str, list] = {k: [] for k in ("slice_id", "series_id", "slice_index", "dhash")}
    images = []
    for s in range(n_series):
        hu = render_volume(10 + s, n_slices, size=SIZE).hu
        order = range(n_slices - 1, -1, -1) if s == 0 else range(n_slices)
        for i in order:
            images.append(hu[i])
            cols["slice_id"].append(f"sl-{s}-{i:03d}")
            cols["series_id"].append(f"ser-{s}")
            cols["slice_index"].append(i)
        cols["dhash"] += dhash64_hu(hu[list(order)]).tolist()
    images_a = np.stack(images)
    n = len(images)
    records = []
    for part, rows in enumerate((slice(0, n // 2), slice(n // 2, n))):
        w = shards.ShardWriter()
        m = rows.stop - rows.start
        w.write(shards.table_from_arrays(
            images_a[rows], slice_id=cols["slice_id"][rows], patient_id=[f"p-{x}" for x in cols["series_id"][rows]],
            study_id=cols["series_id"][rows], series_id=cols["series_id"][rows], slice_index=cols["slice_index"][rows],
            z_mm=[float(z) for z in cols["slice_index"][rows]], spacing_mm=[[1.0, 1.0]] * m, source=["phantom"] * m,
            label=[None] * m, dhash=cols["dhash"][rows]))
        records.append(w.finish(url, f"part-{part}.parquet").as_dict())
    shards.write_manifest(url, {"kind": "prep", "intensity": "hu", "shards": records,
                                "counts": {"slices": n}, "rejects": [], "config": {}})
    return {k: np.array(v, dtype=np.uint64 if k == "dhash" else None) for k, v in cols.items()}


@pytest.fixture(scope="module")
def prep(tmp_path_factory) -> tuple[str, dict[str, np.ndarray]]:
    url = str(tmp_path_factory.mktemp("prep") / "out")
    return url, write_prep_output(url)


def expected_hash_keep(cols: dict[str, np.ndarray], t: int) -> set[str]:
    """The paper's greedy per series in z order, from the stored dhash column, written plainly."""
    kept = set()
    for s in np.unique(cols["series_id"]):
        rows = np.flatnonzero(cols["series_id"] == s)
        rows = rows[np.argsort(cols["slice_index"][rows])]
        remaining = list(rows)
        while remaining:
            ref = remaining.pop(0)
            kept.add(str(cols["slice_id"][ref]))
            remaining = [i for i in remaining if int(hamming(cols["dhash"][i], cols["dhash"][ref])) > t]
    return kept


def test_hash_reduce_commits_exactly_the_kept_rows_with_a_report(prep, tmp_path, capsys):
    src, cols = prep
    dst = str(tmp_path / "sel")
    assert main(["reduce", src, dst, "--strategy", "hash", "--threshold", "6", "--no-progress"]) == 0
    kept = expected_hash_keep(cols, 6)
    assert 3 < len(kept) < N_SERIES * N_SLICES
    table = shards.read_table(dst)
    assert sorted(table.column("slice_id").to_pylist()) == sorted(kept)
    # the rows are the base rows, pixels included (no copies: the selection folder holds no shards)
    assert table.num_rows == len(kept) and table.column("image").null_count == 0
    assert not list(Path(dst).glob("part-*.parquet"))
    m = shards.read_manifest(dst)
    assert m["kind"] == "selection" and m["counts"] == {"base_rows": N_SERIES * N_SLICES, "kept_rows": len(kept)}
    assert m["config"]["strategy"] == "hash" and m["config"]["threshold"] == 6
    # streaming readers see the same rows
    streamed = [s for b in shards.iter_slices(dst, batch_rows=16, columns=["slice_id"]) for s in b["slice_id"]]
    assert sorted(streamed) == sorted(kept)
    report = (Path(dst) / "report" / "report.md").read_text()
    assert f"kept: {len(kept)} of {N_SERIES * N_SLICES} slices" in report
    assert "maximum Hamming distance = 6" in report and "| ser-0 |" in report and "time:" in report
    png = (Path(dst) / "report" / "examples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    per_series = (Path(dst) / "report" / "per_series.csv").read_text().splitlines()
    assert per_series[0] == "series_id,slices,kept,kept_fraction" and len(per_series) == N_SERIES + 1
    assert sum(int(line.split(",")[2]) for line in per_series[1:]) == len(kept)
    assert f"kept {len(kept)} of {N_SERIES * N_SLICES}" in capsys.readouterr().out


def test_target_fraction_via_cli_and_mlflow_run_in_sqlite(prep, tmp_path):
    import mlflow

    src, _ = prep
    dst = str(tmp_path / "sel-ssim")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["reduce", src, dst, "--strategy", "ssim", "--size", "32", "--target-fraction", "0.5",
                 "--tracking-uri", uri, "--experiment", "reduce-test", "--no-progress"]) == 0
    n = shards.read_table(dst, columns=["slice_id"]).num_rows
    assert abs(n / (N_SERIES * N_SLICES) - 0.5) <= 0.01 + 1e-9
    cl = mlflow.MlflowClient(tracking_uri=uri)
    exp = cl.get_experiment_by_name("reduce-test")
    runs = cl.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["strategy"] == "ssim"
    assert run.data.metrics["kept"] == n
    assert run.data.metrics["kept_fraction"] == pytest.approx(n / (N_SERIES * N_SLICES))
    artifacts = {a.path for a in cl.list_artifacts(run.info.run_id, "reduce_report")}
    assert artifacts == {"reduce_report/report.md", "reduce_report/examples.png", "reduce_report/per_series.csv"}


def test_embedding_kcenter_from_the_cli_records_every_option_it_ran_with(prep, tmp_path):
    """ctssl reduce loads the encoder and hands it to the strategy; the manifest keeps the options
    (model, mode, size, the windows chosen for HU data) as plain values, the encoder itself not."""
    src, _ = prep
    dst = str(tmp_path / "sel-kc")
    assert main(["reduce", src, dst, "--strategy", "embedding", "--mode", "kcenter", "--size", "32",
                 "--target-fraction", "0.25", "--no-progress"]) == 0
    n = shards.read_table(dst, columns=["slice_id"]).num_rows
    assert n == round(0.25 * N_SERIES * N_SLICES)
    options = shards.read_manifest(dst)["config"]["options"]
    assert options == {"model": "resnet18", "mode": "kcenter", "size": 32, "batch_size": 64,
                       "windows": ["lung"], "window": 8}
    ssim = str(tmp_path / "sel-ssim-opts")
    assert main(["reduce", src, ssim, "--strategy", "ssim", "--size", "32", "--no-progress"]) == 0
    assert shards.read_manifest(ssim)["config"]["options"] == {"size": 32, "window": 8}


def test_reducing_a_selection_again_refers_to_the_original_prep_output(prep, tmp_path):
    src, cols = prep
    first, second = str(tmp_path / "every2"), str(tmp_path / "every2-hash")
    assert main(["reduce", src, first, "--strategy", "every_n", "--threshold", "2", "--no-progress"]) == 0
    assert main(["reduce", first, second, "--strategy", "hash", "--threshold", "0", "--no-progress"]) == 0
    m = shards.read_manifest(second)
    assert m["base"] == str(Path(src).resolve())
    ids_first = set(shards.read_table(first, columns=["slice_id"]).column("slice_id").to_pylist())
    ids_second = set(shards.read_table(second, columns=["slice_id"]).column("slice_id").to_pylist())
    assert len(ids_first) == N_SERIES * N_SLICES // 2
    assert ids_second <= ids_first and len(ids_second) >= len(ids_first) - 2


def test_empty_input_gives_an_empty_valid_selection(tmp_path):
    src, dst = str(tmp_path / "empty"), str(tmp_path / "empty-sel")
    shards.write_manifest(src, {"kind": "prep", "intensity": "hu", "shards": [], "counts": {}, "rejects": [],
                                "config": {}})
    for strategy in ("hash", "ssim"):
        out = f"{dst}-{strategy}"
        assert main(["reduce", src, out, "--strategy", strategy, "--no-progress"]) == 0
        assert shards.read_table(out).num_rows == 0
        assert shards.read_manifest(out)["counts"]["kept_rows"] == 0
        assert "kept: 0 of 0 slices" in (Path(out) / "report" / "report.md").read_text()


@pytest.mark.parametrize("argv,message", [
    (["--strategy", "phash"], "unknown reduction strategy 'phash'; known: embedding, every_n, hash"),
    (["--strategy", "hash", "--threshold", "70"], "--threshold 70.0 is out of range for strategy 'hash'"),
    (["--strategy", "ssim", "--target-fraction", "0"], "--target-fraction 0.0: must be in (0, 1]"),
    (["--strategy", "hash", "--threshold", "3", "--target-fraction", "0.5"], "either --threshold or --target-fraction"),
])
def test_bad_input_exits_2_with_one_clear_line(prep, tmp_path, capsys, argv, message):
    src, _ = prep
    assert main(["reduce", src, str(tmp_path / "x"), *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x" / "_manifest.json").exists()


def test_missing_source_is_a_clear_error(tmp_path, capsys):
    assert main(["reduce", str(tmp_path / "nope"), str(tmp_path / "x"), "--strategy", "hash"]) == 2
    assert "no committed output here" in capsys.readouterr().err


def test_selection_manifest_is_the_last_file_written(prep, tmp_path):
    src, _ = prep
    dst = tmp_path / "order"
    assert main(["reduce", src, str(dst), "--strategy", "every_n", "--threshold", "3", "--no-progress"]) == 0
    mtimes = {p.name: p.stat().st_mtime_ns for p in dst.rglob("*") if p.is_file()}
    assert max(mtimes, key=mtimes.get) == "_manifest.json"
    assert json.loads((dst / "_manifest.json").read_text())["report"]["kept"] == N_SERIES * (N_SLICES // 3)


def test_reduce_from_and_to_s3_on_a_real_s3_server(s3_bucket, tmp_path):
    """The selection and its report live in the object store; readers resolve it there."""
    import fsspec

    src, dst = f"s3://{s3_bucket}/prep", f"s3://{s3_bucket}/sel-hash"
    cols = write_prep_output(src, n_series=2, n_slices=12)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["reduce", src, dst, "--strategy", "hash", "--tracking-uri", uri, "--no-progress"]) == 0
    kept = expected_hash_keep(cols, 6)
    assert sorted(shards.read_table(dst, columns=["slice_id"]).column("slice_id").to_pylist()) == sorted(kept)
    fs = fsspec.filesystem("s3")
    assert fs.exists(f"{s3_bucket}/sel-hash/report/examples.png")
    assert f"kept: {len(kept)} of 24 slices" in fs.cat_file(f"{s3_bucket}/sel-hash/report/report.md").decode()
    import mlflow

    cl = mlflow.MlflowClient(tracking_uri=uri)
    run = cl.search_runs([cl.get_experiment_by_name("ctssl-reduce").experiment_id])[0]
    assert {a.path for a in cl.list_artifacts(run.info.run_id, "reduce_report")} >= {"reduce_report/report.md"}


def test_a_prep_output_is_never_overwritten_by_a_selection(prep, tmp_path, capsys):
    src, _ = prep
    other = str(tmp_path / "other-prep")
    write_prep_output(other, n_series=1, n_slices=4)
    before = (Path(other) / "_manifest.json").read_bytes()
    assert main(["reduce", src, other, "--strategy", "hash", "--no-progress"]) == 2
    assert "holds a prep output" in capsys.readouterr().err
    assert (Path(other) / "_manifest.json").read_bytes() == before
    # an older selection may be replaced
    sel = str(tmp_path / "sel")
    assert main(["reduce", src, sel, "--strategy", "every_n", "--threshold", "2", "--no-progress"]) == 0
    assert main(["reduce", src, sel, "--strategy", "every_n", "--threshold", "4", "--no-progress"]) == 0
    assert shards.read_table(sel, columns=["slice_id"]).num_rows == N_SERIES * (N_SLICES // 4)
