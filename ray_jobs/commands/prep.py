"""``ctssl prep SRC DST``: CT inputs -> Parquet shards + manifest on a local path or s3:// URL."""

from __future__ import annotations

import argparse
import json
import os
import sys

from data_prep.deid import load_key
from data_prep.reader_warnings import summary_line
from data_prep.reject_kinds import summary_line as kinds_line
from data_prep.sources import source_names
from data_prep.volume_qc import summary_lines

NAME = "prep"
HELP = "convert DICOM / NIfTI / MedMNIST / image folders into Parquet shards with a manifest"
DESCRIPTION = """Convert CT inputs into int16-HU Parquet shards (zstd) with a committing _manifest.json.

Patient, study and series identifiers become keyed pseudonyms (HMAC-SHA256): set $CTSSL_DEID_KEY or
pass --deid-key-file. A rerun after a crash resumes where it stopped. Every input is either written
or listed with its reason in the manifest's "rejects".

examples:
  ctssl prep /data/LIDC-IDRI s3://bucket/lidc --workers 8 --address auto
  ctssl prep ./brain_ct ./shards/brain --labels ./brain_ct/labels.csv
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="input folder or file (DICOM tree, NIfTI, .npz, image folder)")
    p.add_argument("dst", help="output URL: local path, file:// or s3://bucket/prefix")
    p.add_argument("--source", choices=source_names(), help="input layout (default: detected)")
    p.add_argument("--size", type=int, default=256,
                   help="output in-plane size; aspect kept by padding with air (default 256; 0 = native)")
    p.add_argument("--dataset", help="dataset name stored in the 'source' column (default: the layout name)")
    p.add_argument("--labels", dest="labels_csv", help="CSV with columns file,label (paths relative to the CSV)")
    p.add_argument("--workers", type=int, default=1, help="parallel prep processes (Ray tasks)")
    p.add_argument("--executor", choices=["ray", "local", "auto"], default="auto",
                   help="'local' runs in this process without Ray (default auto: local for 1 worker)")
    p.add_argument("--address", help="Ray cluster address (default: a private local Ray; 'auto' = running cluster)")
    p.add_argument("--shard-index", type=int, default=int(os.environ.get("JOB_COMPLETION_INDEX", "0")),
                   help="this process's part of the work (default $JOB_COMPLETION_INDEX or 0)")
    p.add_argument("--num-shards", type=int, default=1, help="number of processes splitting the work")
    p.add_argument("--rows-per-shard", type=int, default=1024, help="slices per Parquet shard")
    p.add_argument("--deid-key-file", help="file holding the de-identification key (else $CTSSL_DEID_KEY)")
    p.add_argument("--max-reject-fraction", type=float,
                   help="fail (exit 3) when more than this fraction of inputs is rejected")
    p.add_argument("--volume-check", choices=["warn", "skip", "strict"], default="warn",
                   help="a series that is no regular volume (slices at one position, missing slices, gantry "
                        "tilt, mixed orientation or size): warn = write it and list its flags (default), "
                        "skip = leave it out and list it as rejects, strict = stop naming its series id")
    p.add_argument("--no-progress", action="store_true", help="no progress bar / lines")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    from data_prep.prep import PrepConfig, RejectThresholdExceeded, run_prep

    cfg = PrepConfig(src=args.src, dst=args.dst, source=args.source, size=args.size or None,
                     dataset=args.dataset, labels_csv=args.labels_csv, workers=args.workers,
                     executor=args.executor, address=args.address, shard_index=args.shard_index,
                     num_shards=args.num_shards, rows_per_shard=args.rows_per_shard,
                     max_reject_fraction=args.max_reject_fraction, progress=not args.no_progress,
                     volume_check=args.volume_check)
    key = load_key(args.deid_key_file)
    try:
        s = run_prep(cfg, key)
        code = 0
    except RejectThresholdExceeded as e:
        s, code = e.summary, 3
        print(f"ctssl prep: error: {e}", file=sys.stderr)
    print_summary(s, args.dst, as_json=args.json)
    return code


def print_summary(s, dst: str, as_json: bool = False) -> None:  # noqa: ANN001 - PrepSummary
    if as_json:
        print(json.dumps({k: v for k, v in vars(s).items()}, indent=1))
        return
    state = "committed" if s.committed else "partial (waiting for other --shard-index processes)"
    print(f"prep {state}: {s.slices_written} slices from {s.series} series written to {dst} "
          f"in {s.seconds:.1f}s; {s.rejected} of {s.inputs} inputs rejected"
          + (f", {s.ignored} non-image files ignored" if s.ignored else "")
          + (f", {s.resumed_series} series resumed from an earlier run" if s.resumed_series else ""))

    if s.rejects:
        print(kinds_line(s.rejects))

    for line in summary_lines(s.volume_qc):
        print(line)

    line = summary_line(getattr(s, "reader_warnings", {}), dst)
    if line:
        print(line)
    for r in s.rejects[:20]:
        print(f"  rejected {r['input']}: {r['reason']}")
    if len(s.rejects) > 20:
        print(f"  ... and {len(s.rejects) - 20} more (see {dst}/_manifest.json)")
