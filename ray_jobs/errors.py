"""User-facing errors of the distributed entry points (printed by the CLI without a traceback)."""

from ctssl_base.errors import UserError


class CLIError(UserError):
    """Bad command-line arguments or a precondition that fails before any work starts."""
