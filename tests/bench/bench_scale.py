"""Cost per slice at growing pool sizes: ``make bench-scale [SCALE_SIZES=1000,10000,100000] [S3=1]``.

For each size a phantom pool of 256 px DICOM slices (100 slices per patient) is written once into
``$CTSSL_BENCH_CACHE/scale-<n>`` and reused (its generation time is printed apart). Then, each in its
own process under ``/usr/bin/time -v`` so the peak RSS is that stage's alone, as a user runs them:
``ctssl prep`` (one local worker), ``ctssl reduce --strategy hash`` at volume and at global scope; the
pre-training input path over the prep output (first batch, steady slices/s and peak RSS of the reader
a one-worker run uses); and the same pool as a study's data stages: ``ctssl study run --until
reduce-hash6`` (prep on the study's Ray executor and the hash reduction), ``ctssl study plan`` (which
reads the finished stages' markers and the measured pool) and the same ``study run`` again, which
reuses both stages: the driver's reuse check at that pool size.
With ``SCALE_S3=1`` prep and the volume-scope reduction also run against an S3 API (moto's server on
127.0.0.1, in this process), writing and reading ``s3://scale/...``, with the requests the server
answered counted by kind (list, get, head, put, post, delete).
Printed per size: seconds per 1,000 slices and peak RSS of each stage, shard count and bytes, manifest
and commit-record bytes, the study's seconds; then the ratios of per-slice cost and of peak RSS between
consecutive sizes (a pipeline that is linear in time and bounded in memory keeps both near 1).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("CTSSL_BENCH_CACHE", "/tmp/ctssl-bench-cache"))
KEY = "bench-scale-key-5e1d7a93c2f4b860-q9"  # passes data_prep.deid.key_weakness
PER_PATIENT = 100
CTSSL = str(Path(sys.executable).parent / "ctssl")


def pool(n: int) -> tuple[Path, float]:
    """The cached phantom pool of ``n`` slices and the seconds its generation took (0 when reused)."""
    from data_prep.phantom.cohort import write_cohort

    root = CACHE / f"scale-{n}"
    if (root / ".complete").exists():
        return root, 0.0
    shutil.rmtree(root, ignore_errors=True)
    t = time.perf_counter()
    write_cohort(root, patients=max(1, n // PER_PATIENT), slices=min(n, PER_PATIENT), size=256, seed=0,
                 workers=os.cpu_count() or 1)
    (root / ".complete").write_text("ok")
    return root, time.perf_counter() - t


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one command run under ``/usr/bin/time -v``."""
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "CTSSL_DEID_KEY": KEY, **(env or {})})
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: exit {p.returncode}\n{p.stderr[-2000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    return dt, int(rss.group(1)) / 1024 if rss else float("nan")


def measure(n: int, work: Path) -> dict[str, float]:
    src, gen = pool(n)
    print(f"{n} slices: pool ready ({gen:.0f} s to generate)", flush=True)
    out = work / f"prep-{n}"
    shutil.rmtree(out, ignore_errors=True)
    row: dict[str, float] = {"n": n, "gen_s": gen}
    row["prep_s"], row["prep_rss"] = timed([CTSSL, "prep", str(src), str(out), "--executor", "local",
                                            "--no-progress"])
    shards = list(out.glob("part-*.parquet"))
    row["shards"], row["shard_mb"] = len(shards), sum(p.stat().st_size for p in shards) / 2**20
    row["manifest_kb"] = (out / "_manifest.json").stat().st_size / 1024
    row["commits_kb"] = sum(p.stat().st_size for p in (out / "_commits").glob("*")) / 1024 \
        if (out / "_commits").is_dir() else 0.0
    for scope in ("volume", "global"):
        sel = work / f"sel-{scope}-{n}"
        shutil.rmtree(sel, ignore_errors=True)
        row[f"{scope}_s"], row[f"{scope}_rss"] = timed([CTSSL, "reduce", str(out), str(sel), "--strategy", "hash",
                                                        "--scope", scope, "--no-progress"])
    row.update(input_leg(out))
    row.update(study_leg(n, src, work))
    if S3 is not None:
        row.update(S3.leg(n, src))
    return row


class S3Leg:
    """An S3 API for the prep and reduction commands, counting the requests it answers."""

    BUCKET = "scale"

    def __init__(self) -> None:
        import boto3
        from moto.server import ThreadedMotoServer

        self.requests: collections.Counter[str] = collections.Counter()
        log = logging.getLogger("werkzeug")  # the server's request log: one line per request answered
        log.handlers[:] = [_RequestCounter(self.requests)]
        log.setLevel(logging.INFO)
        log.propagate = False
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.env = {"CTSSL_S3_ENDPOINT_URL": self.endpoint, "AWS_ENDPOINT_URL": self.endpoint,
                    "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="bench",
                     aws_secret_access_key="bench").create_bucket(Bucket=self.BUCKET)

    def leg(self, n: int, src: Path) -> dict[str, float]:
        out, sel = f"s3://{self.BUCKET}/prep-{n}", f"s3://{self.BUCKET}/sel-volume-{n}"
        row: dict[str, float] = {}
        for name, cmd in (("s3_prep", [CTSSL, "prep", str(src), out, "--executor", "local", "--no-progress"]),
                          ("s3_volume", [CTSSL, "reduce", out, sel, "--strategy", "hash", "--scope", "volume",
                                         "--no-progress"])):
            before = collections.Counter(self.requests)
            row[f"{name}_s"], row[f"{name}_rss"] = timed(cmd, self.env)
            row[f"{name}_requests"] = dict(self.requests - before)  # type: ignore[assignment]
        return row

    def stop(self) -> None:
        self.server.stop()


class _RequestCounter(logging.Handler):
    """Counts werkzeug's request lines (``"GET /bucket?list-type=2&prefix=... HTTP/1.1" 200``) by kind."""

    LINE = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) (\S+)')

    def __init__(self, counter: collections.Counter[str]) -> None:
        super().__init__()
        self.counter = counter

    def emit(self, record: logging.LogRecord) -> None:
        m = self.LINE.search(record.getMessage())
        if not m:
            return
        method, path = m.groups()
        listing = method == "GET" and ("list-type=" in path or "prefix=" in path or "delimiter=" in path)
        self.counter["list" if listing else method.lower()] += 1


S3: S3Leg | None = None


#: the pre-training input path in one process, as a one-worker run reads it (ShardStream: pyarrow, one
#: shard read ahead on a background thread, a local shuffle window), up to READ_LIMIT slices
READ_LIMIT = 20_000
READER = """
import json, sys, time
import torch
from ray_jobs.pretrain.data import decode_batch, inspect_data, to_training_tensor
from ray_jobs.pretrain.shard_stream import ShardStream
torch.set_num_threads(1)
t0 = time.perf_counter()
stream = ShardStream(inspect_data(sys.argv[1], None))
first, n, t1 = None, 0, None
for _epoch in range(3):  # a small pool is read again until the limit (each epoch a new shard order)
    for b in stream.iter_batches(batch_size=64, local_shuffle_buffer_size=1024):
        x = to_training_tensor(decode_batch(b), None, torch.device("cpu"))
        if first is None:
            first, t1 = time.perf_counter() - t0, time.perf_counter()
            continue
        n += len(x)
        if n >= int(sys.argv[2]):
            break
    if n >= int(sys.argv[2]):
        break
print(json.dumps({"first_batch_s": first, "read_rate": n / (time.perf_counter() - t1)}))
"""


def input_leg(prep_out: Path) -> dict[str, float]:
    """First-batch latency, steady slices/s and peak RSS of reading the prep output for pre-training."""
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", READER, str(prep_out), str(READ_LIMIT)],
                       capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        raise SystemExit(f"input path: exit {p.returncode}\n{p.stderr[-2000:]}")
    got = json.loads(p.stdout.strip().splitlines()[-1])
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    return {**got, "read_s": time.perf_counter() - t, "read_rss": int(rss.group(1)) / 1024 if rss else float("nan")}


STUDY = """\
apiVersion: ctssl/v1
kind: Study
metadata: {{name: scale-{n}}}
spec:
  storage: {root}/storage
  workdir: {root}/work
  data:
    pretrain: {{type: dicom, path: {src}}}
    labelled: {{type: phantom, patients: 4, slices: 4, renderSize: 64, size: 32, task: region}}
  reduction: {{levels: [null, 6]}}
  pretrain: {{backbone: resnet18, maxSteps: 1, methods: {{byol: {{}}}}}}
"""


def study_leg(n: int, src: Path, work: Path) -> dict[str, float]:
    """Seconds of the study's data stages, of its plan and of a rerun that reuses them (with peak RSS)."""
    root = work / f"study-{n}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    spec = root / "study.yaml"
    spec.write_text(STUDY.format(n=n, root=root, src=src))
    until = ["--until", "reduce-hash6"]
    out: dict[str, float] = {}
    out["study_s"], out["study_rss"] = timed([CTSSL, "study", "run", "-f", str(spec), *until])
    out["plan_s"], out["plan_rss"] = timed([CTSSL, "study", "plan", "-f", str(spec)])
    out["reuse_s"], out["reuse_rss"] = timed([CTSSL, "study", "run", "-f", str(spec), *until])
    return out


def checkpoint_leg(work: Path) -> list[tuple[str, float, float, float]]:
    """(where, MB, ctssl s, peer s) for one BYOL resnet50 pre-training checkpoint: written by the
    training loop's checkpoint.save, then copied into the run folder by CheckpointStore.save, on local
    disk (peer: a plain file copy of the same bytes) and on the S3 API (peer: boto3's upload_file)."""
    import boto3
    import torch

    from ray_jobs.pretrain import checkpoint as ckpt_io
    from ray_jobs.pretrain.checkpoint_store import CheckpointStore
    from ssl_core.methods import create_method

    method = create_method("byol", backbone="resnet50", in_chans=1, img_size=224)
    opt = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)
    for p in method.parameters():  # momentum buffers, as a checkpoint after a step holds them
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    local = work / "ckpt-local"
    shutil.rmtree(local, ignore_errors=True)
    t = time.perf_counter()
    ckpt_io.save(str(local), method=method, optimizer=opt, progress=ckpt_io.Progress(step=1, epoch=0))
    write_s = time.perf_counter() - t
    mb = sum(f.stat().st_size for f in local.iterdir()) / 2**20
    out = [("serialise (checkpoint.save)", mb, write_s, float("nan"))]
    big = max(local.iterdir(), key=lambda f: f.stat().st_size)
    t = time.perf_counter()
    shutil.copyfile(big, work / "ckpt-copy.bin")
    peer = time.perf_counter() - t
    t = time.perf_counter()
    CheckpointStore(str(work / "ckpt-runs"), "bench").save(str(local))
    out.append(("local disk (CheckpointStore.save)", mb, time.perf_counter() - t, peer))
    if S3 is not None:
        cl = boto3.client("s3", endpoint_url=S3.endpoint, region_name="us-east-1", aws_access_key_id="bench",
                          aws_secret_access_key="bench")
        t = time.perf_counter()
        cl.upload_file(str(big), S3.BUCKET, "peer/ckpt.bin")
        peer = time.perf_counter() - t
        saved = {k: os.environ.get(k) for k in S3.env}
        os.environ.update(S3.env)
        try:
            t = time.perf_counter()
            CheckpointStore(f"s3://{S3.BUCKET}/ckpt-runs", "bench").save(str(local))
            out.append(("S3 API (CheckpointStore.save)", mb, time.perf_counter() - t, peer))
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return out


def _counts(c: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "-"


def main() -> int:
    global S3
    sizes = [int(s) for s in os.environ.get("SCALE_SIZES", "1000,10000,100000").split(",") if s.strip()]
    if os.environ.get("SCALE_S3") == "1":
        S3 = S3Leg()
    work = CACHE / "scale-work"
    work.mkdir(parents=True, exist_ok=True)
    print(f"load average at start: {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()})")
    rows = []
    for n in sizes:
        rows.append(measure(n, work))
        print(f"measured {n}: {json.dumps(rows[-1], default=str)}", flush=True)  # kept if a later size fails
    print(f"\n{'slices':>8s} {'gen s':>7s} {'prep s/1k':>9s} {'prep MB':>8s} {'shards':>6s} {'shard MB':>8s} "
          f"{'manif KB':>8s} {'commit KB':>9s} {'vol s/1k':>8s} {'vol MB':>7s} {'glob s/1k':>9s} {'glob MB':>7s}")
    for r in rows:
        k = r["n"] / 1000
        print(f"{r['n']:8d} {r['gen_s']:7.1f} {r['prep_s'] / k:9.2f} {r['prep_rss']:8.0f} {r['shards']:6d} "
              f"{r['shard_mb']:8.1f} {r['manifest_kb']:8.1f} {r['commits_kb']:9.1f} {r['volume_s'] / k:8.2f} "
              f"{r['volume_rss']:7.0f} {r['global_s'] / k:9.2f} {r['global_rss']:7.0f}")
    print(f"\n{'slices':>8s} {'first batch s':>13s} {'read slices/s':>13s} {'read MB':>7s}  (pre-training input, "
          f"one process, 1 torch thread, at most {READ_LIMIT:,} slices)")
    for r in rows:
        print(f"{r['n']:8d} {r['first_batch_s']:13.2f} {r['read_rate']:13.0f} {r['read_rss']:7.0f}")
    print(f"\n{'slices':>8s} {'study data stages s/1k':>22s} {'driver MB':>9s} {'plan s':>7s} {'plan MB':>7s} "
          f"{'rerun (reused) s':>16s} {'rerun MB':>8s}")
    for r in rows:
        print(f"{r['n']:8d} {r['study_s'] / (r['n'] / 1000):22.2f} {r['study_rss']:9.0f} {r['plan_s']:7.1f} "
              f"{r['plan_rss']:7.0f} {r['reuse_s']:16.1f} {r['reuse_rss']:8.0f}")
    if S3 is not None:
        print(f"\n{'slices':>8s} {'S3 prep s/1k':>12s} {'MB':>5s}  {'requests':<40s} {'S3 reduce s/1k':>14s} "
              f"{'MB':>5s}  requests")
        for r in rows:
            k = r["n"] / 1000
            print(f"{r['n']:8d} {r['s3_prep_s'] / k:12.2f} {r['s3_prep_rss']:5.0f}  "
                  f"{_counts(r['s3_prep_requests']):<40s} {r['s3_volume_s'] / k:14.2f} {r['s3_volume_rss']:5.0f}  "
                  f"{_counts(r['s3_volume_requests'])}")
    print(f"\n{'checkpoint (BYOL resnet50)':<36s} {'MB':>6s} {'s':>6s} {'s per 100 MB':>12s} {'peer s':>7s} "
          f"{'ratio':>6s}")
    for where, mb, sec, peer in checkpoint_leg(work):
        print(f"{where:<36s} {mb:6.0f} {sec:6.2f} {sec / mb * 100:12.2f} {peer:7.2f} {sec / peer:6.2f}")
    for a, b in zip(rows, rows[1:], strict=False):
        per = {s: (b[f"{s}_s"] / b["n"]) / (a[f"{s}_s"] / a["n"]) for s in ("prep", "volume", "global", "study")}
        rss = {s: b[f"{s}_rss"] / a[f"{s}_rss"] for s in ("prep", "volume", "global", "study", "read")}
        per["read"] = a["read_rate"] / b["read_rate"]  # seconds per slice read
        print(f"{b['n']} vs {a['n']}: time per slice " + ", ".join(f"{s} x{v:.2f}" for s, v in per.items())
              + "; peak RSS " + ", ".join(f"{s} x{v:.2f}" for s, v in rss.items()))
        if S3 is not None:
            s3 = {s: (b[f"{s}_s"] / b["n"]) / (a[f"{s}_s"] / a["n"]) for s in ("s3_prep", "s3_volume")}
            print(f"{b['n']} vs {a['n']} on S3: time per slice " + ", ".join(f"{s} x{v:.2f}" for s, v in s3.items()))
    if S3 is not None:
        S3.stop()
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
