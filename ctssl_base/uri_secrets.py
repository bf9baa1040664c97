"""Passwords inside URIs (``postgresql://user:secret@db/mlflow``, ``https://user:token@mlflow``).

Tracking and database URIs are printed, recorded as MLflow params and forwarded to Ray workers; the
password of their ``user:password@`` part must reach none of those. Only the password is hidden: the
user and host still say which server was meant.
"""

from __future__ import annotations

import re

#: the password of a URI's ``user:password@`` part; hosts only (a scheme with ``//``), so a SQLite path
#: holding ``:`` and ``@`` is left alone
_URI_PASSWORD = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@?#]*):(?P<pw>[^@/?#]*)@")
#: the same anywhere in a longer text (a param holding a command line, an error message)
_ANY_URI_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@?#\s]*):(?P<pw>[^@/?#\s]*)@")


def redact_uri(uri: str, *, keep_password_mark: bool = True) -> str:
    """``uri`` with the password of its ``user:password@`` part replaced by ``***`` (or dropped, with
    ``keep_password_mark=False``: the form handed to processes that get the password from
    ``MLFLOW_TRACKING_PASSWORD`` or a database's own settings instead).

    Tracking URIs such as ``postgresql://mlflow:secret@db/mlflow`` are printed, recorded as MLflow
    params and forwarded to Ray workers; the password must reach none of those. A URI without a
    password, SQLite paths and plain names come back unchanged."""
    if not isinstance(uri, str) or "@" not in uri:
        return uri
    return _URI_PASSWORD.sub(
        lambda m: f"{m['head']}{m['user']}:***@" if keep_password_mark else f"{m['head']}{m['user']}@", uri, count=1)


def redact_text(text: str) -> str:
    """Every ``scheme://user:password@`` in ``text`` with its password masked (see :func:`redact_uri`)."""
    if "@" not in text:
        return text
    return _ANY_URI_PASSWORD.sub(lambda m: f"{m['head']}{m['user']}:***@", text)
