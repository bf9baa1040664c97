"""Cost per slice at growing pool sizes, on local disk: ``make bench-scale [SCALE_SIZES=1000,10000,100000]``.

For each size a phantom pool of 256 px DICOM slices (100 slices per patient) is written once into
``$CTSSL_BENCH_CACHE/scale-<n>`` and reused (its generation time is printed apart). Then, each in its
own process under ``/usr/bin/time -v`` so the peak RSS is that stage's alone, as a user runs them:
``ctssl prep`` (one local worker), ``ctssl reduce --strategy hash`` at volume and at global scope.
Printed per size: seconds per 1,000 slices and peak RSS of each stage, shard count and bytes, manifest
and commit-record bytes; then the ratios of per-slice cost and of peak RSS between consecutive sizes
(a pipeline that is linear in time and bounded in memory keeps both near 1).
"""

from __future__ import annotations

import os
import re
import shutil
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


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one command run under ``/usr/bin/time -v``."""
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "CTSSL_DEID_KEY": KEY})
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: exit {p.returncode}\n{p.stderr[-2000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    return dt, int(rss.group(1)) / 1024 if rss else float("nan")


def measure(n: int, work: Path) -> dict[str, float]:
    src, gen = pool(n)
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
    return row


def main() -> int:
    sizes = [int(s) for s in os.environ.get("SCALE_SIZES", "1000,10000,100000").split(",") if s.strip()]
    work = CACHE / "scale-work"
    work.mkdir(parents=True, exist_ok=True)
    print(f"load average at start: {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()})")
    rows = [measure(n, work) for n in sizes]
    print(f"\n{'slices':>8s} {'gen s':>7s} {'prep s/1k':>9s} {'prep MB':>8s} {'shards':>6s} {'shard MB':>8s} "
          f"{'manif KB':>8s} {'commit KB':>9s} {'vol s/1k':>8s} {'vol MB':>7s} {'glob s/1k':>9s} {'glob MB':>7s}")
    for r in rows:
        k = r["n"] / 1000
        print(f"{r['n']:8d} {r['gen_s']:7.1f} {r['prep_s'] / k:9.2f} {r['prep_rss']:8.0f} {r['shards']:6d} "
              f"{r['shard_mb']:8.1f} {r['manifest_kb']:8.1f} {r['commits_kb']:9.1f} {r['volume_s'] / k:8.2f} "
              f"{r['volume_rss']:7.0f} {r['global_s'] / k:9.2f} {r['global_rss']:7.0f}")
    for a, b in zip(rows, rows[1:], strict=False):
        per = {s: (b[f"{s}_s"] / b["n"]) / (a[f"{s}_s"] / a["n"]) for s in ("prep", "volume", "global")}
        rss = {s: b[f"{s}_rss"] / a[f"{s}_rss"] for s in ("prep", "volume", "global")}
        print(f"{b['n']} vs {a['n']}: time per slice " + ", ".join(f"{s} x{v:.2f}" for s, v in per.items())
              + "; peak RSS " + ", ".join(f"{s} x{v:.2f}" for s, v in rss.items()))
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
