"""`ctssl --help` stays quick: the command modules import torch, Ray, MLflow and the other heavy
libraries only inside the functions that use them, so a typo or a help request does not pay seconds
of imports. Everything else sits at the top of its module."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "ray", "mlflow", "pandas", "matplotlib", "sklearn", "timm", "kubernetes", "lightly")

PROBE = """
import contextlib, io, sys
from ray_jobs.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main(sys.argv[1:])
    except SystemExit:
        pass
print(",".join(sorted(m for m in sys.modules if "." not in m)))
"""


def _loaded(*argv: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, check=True)
    return set(out.stdout.strip().splitlines()[-1].split(","))


def test_help_imports_no_heavy_library():
    for argv in (["--help"], ["pretrain", "--help"], ["study", "plan", "--help"]):
        heavy = sorted(set(HEAVY) & _loaded(*argv))
        assert heavy == [], f"ctssl {' '.join(argv)} imported {heavy}"
