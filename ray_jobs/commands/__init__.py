"""One module per ``ctssl`` subcommand.

Each module defines ``NAME`` (the subcommand), ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. :mod:`ray_jobs.cli` discovers them, so adding a subcommand is one new file and
the charts' tests can parse every rendered command line against the real parser.
"""
