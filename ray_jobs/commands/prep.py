"""``ctssl prep SRC DST``: CT inputs -> Parquet shards + manifest on a local path or s3:// URL."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ctssl_base import settings
from data_prep.deid import load_key
from data_prep.prep import PrepConfig
from data_prep.reader_warnings import summary_line
from data_prep.reject_kinds import summary_line as kinds_line
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
    """SRC and DST, PrepConfig's table, then the options that are the command's own."""
    p.add_argument("src", help="input folder or file (DICOM tree, NIfTI, .npz, image folder)")
    p.add_argument("dst", help="output URL: local path, file:// or s3://bucket/prefix")
    settings.add_flags(p, PrepConfig)
    p.add_argument("--shard-index", type=int, default=int(os.environ.get("JOB_COMPLETION_INDEX", "0")),
                   help="this process's part of the work (default $JOB_COMPLETION_INDEX or 0)")
    p.add_argument("--deid-key-file", help="file holding the de-identification key (else $CTSSL_DEID_KEY)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    from data_prep.prep import RejectThresholdExceeded, run_prep

    cfg = settings.from_args(PrepConfig, args, src=args.src, dst=args.dst, shard_index=args.shard_index)
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
