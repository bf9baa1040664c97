"""Checks of the names that become folders: an experiment name is a path part under ``--storage``.

``ctssl pretrain`` keeps its checkpoints in ``STORAGE/EXPERIMENT`` and prunes the ``checkpoint_*``
folders there that Ray Train no longer keeps; ``ctssl finetune`` writes its Tune runs under the same
kind of name. A name of ``..``, ``.``, one holding ``/`` or ``\\`` or nothing at all would point that
at the storage root itself or at a folder beside or above it, so such names are refused before any
work, in one line naming the flag.
"""

from __future__ import annotations

import unicodedata

from ctssl_base.errors import UserError

#: longer names would make folder names near the 255-byte limit of common file systems
MAX_NAME_LENGTH = 200


def experiment_name_problem(name: str) -> str | None:
    """What is wrong with ``name`` as an experiment (and so folder) name, or None when it is fine."""
    if not isinstance(name, str) or not name.strip():
        return "must be a non-empty name"
    if name in (".", ".."):
        return "must not be '.' or '..' (it would name the storage root or the folder above it)"
    if "/" in name or "\\" in name:
        return "must not hold a path separator ('/' or '\\')"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
        return "must not hold control characters"
    if name != name.strip():
        return "must not begin or end with a space"
    if len(name) > MAX_NAME_LENGTH:
        return f"must be at most {MAX_NAME_LENGTH} characters, got {len(name)}"
    return None


def check_experiment_name(name: str, flag: str = "--experiment") -> str:
    """``name`` when it can name an experiment and its folder, else :class:`UserError` naming ``flag``."""
    problem = experiment_name_problem(name)
    if problem is not None:
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise UserError(f"{flag} {shown}: {problem}")
    return name
