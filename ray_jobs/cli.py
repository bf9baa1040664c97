"""The ``ctssl`` command line: a thin dispatcher over the modules in :mod:`ray_jobs.commands`."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType

from ctssl_base.errors import UserError
from ray_jobs import commands as _commands_pkg


def _command_modules() -> list[ModuleType]:
    mods = []
    for info in sorted(pkgutil.iter_modules(_commands_pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{_commands_pkg.__name__}.{info.name}")
        if hasattr(mod, "NAME") and hasattr(mod, "run"):
            mods.append(mod)
    return mods


def _version() -> str:
    """The installed distribution's version (pyproject's [project].version)."""

    try:
        return version("ctssl")
    except PackageNotFoundError:  # sources on sys.path without an install
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The full parser; also used by the chart tests to check rendered commands against the CLI."""
    parser = argparse.ArgumentParser(
        prog="ctssl",
        description="Self-supervised pre-training of CNNs on CT: prep, reduce, pretrain, finetune, report.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                        help="print the ctssl version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in _command_modules():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _prog=p.prog)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"{args._prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{args._prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
