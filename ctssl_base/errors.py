"""Errors a user can act on. The CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad input or configuration: the message names the input and what is wrong with it."""


class ManifestError(UserError):
    """An output folder has no committed manifest, or its files do not match it."""
