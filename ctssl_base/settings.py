"""Settings defined once: a config dataclass's field carries its CLI flag, its study-file key, its help
text and its bounds, and the command-line parser, the config built from parsed flags or from a study
file's section, and the study schema's defaults and descriptions are all made from it.

A field opts in with :func:`setting` in place of ``dataclasses.field``::

    epochs: int = setting(70, key="epochs", schema={"minimum": 1}, help="most epochs (default {default})")

In a help text, ``{default}`` is the default and ``{other_field}`` names another setting of the table
(``--other-field`` in the CLI's help, ```otherKey``` in the study reference), so help cannot drift
from the values or the names. A setting without ``key`` is CLI-only (a Ray address, a tracking URI);
one with ``flag=None`` is study-only. The study schema (``ray_jobs/study/study.schema.json``) keeps
the structure, types and rules the table cannot state; ``make schema`` writes each mapped key's
default, description and bounds into it from here (:mod:`ray_jobs.study.schema_tables`), and
tests/study/test_settings_table.py fails when the checked-in file differs.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

META = "ctssl.setting"


class _Same:
    """The CLI default is the field's (the usual case)."""

    def __repr__(self) -> str:
        return "same"


SAME = _Same()


@dataclass(frozen=True)
class Setting:
    """How one config field appears outside Python."""

    help: str
    flag: str | None = ""  # "" -> --field-name; None -> no CLI flag
    key: str | None = None  # the study file's camelCase key in the stage's section; None -> not in a study
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None  # argparse's type; None -> the default's type
    choices: tuple[Any, ...] | None = None
    #: schema keywords this setting owns beside its default and description (bounds, e.g.
    #: {"minimum": 1, "maximum": 10000}); the type and structure stay in the schema file
    schema: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: "store_true" / "store_false" for a boolean switch (then ``flag`` names the switch, e.g. --no-x)
    action: str | None = None
    action_append: bool = False  # a repeatable flag collecting a list
    #: the CLI's help where the flag is not the setting itself but its negation (--no-x for x: true)
    flag_help: str | None = None
    required: bool = False
    #: the CLI default differs from the field's default (e.g. None there, to tell "not given")
    cli_default: Any = SAME
    #: said in the study reference only, after ``help``: what the key does there beyond the flag (the
    #: stage that reads it, a per-method override)
    study_note: str | None = None
    #: turns the text a user wrote, a flag's or a study value's, into the field's value (a duration "12m"
    #: into seconds, "0.25,1" into a list), after argparse: its UserError reaches the user as one line.
    #: A value that is not text (a study's list, a default) is kept as it is
    read: Callable[[str], Any] | None = None


def setting(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
            **kw: Any) -> Any:
    """A dataclass field with its :class:`Setting` in the field's metadata."""
    meta = {META: Setting(**kw)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Entry:
    """One field of a table: its name, default (factory resolved) and setting."""

    name: str
    default: Any
    setting: Setting

    @property
    def flag(self) -> str | None:
        s = self.setting
        return None if s.flag is None else (s.flag or "--" + self.name.replace("_", "-"))

    @property
    def key(self) -> str | None:
        return self.setting.key


def show(value: Any) -> str:
    """A default as a person writes it: 0.0001, 1e-5, 5,10,all, none."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        text = f"{value:g}"
        return text.replace("e-0", "e-") if "e" in text else text
    if isinstance(value, list | tuple):
        return ",".join(show(v) for v in value)
    return str(value)


def entries(cls: type) -> Iterator[Entry]:
    """The fields of ``cls`` that are settings, in declaration order."""
    for f in dataclasses.fields(cls):
        s = f.metadata.get(META)
        if s is None:
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING and \
            f.default_factory is not dataclasses.MISSING else f.default
        yield Entry(f.name, None if default is dataclasses.MISSING else default, s)


def render(text: str, table: dict[str, Entry], default: Any, style: str) -> str:
    """``text`` with ``{default}`` and ``{field}`` filled in for the CLI (``style="cli"``) or the study."""
    def name(m: re.Match[str]) -> str:
        word = m.group(1)
        if word == "default":
            return show(default)
        e = table.get(word)
        if e is None:
            raise KeyError(f"help text names {{{word}}}, which is no setting of the table")
        if style == "cli":
            return e.flag or word
        return f"`{e.key}`" if e.key else (e.flag or word)

    text = re.sub(r"\{(\w+)\}", name, text)
    return text if style == "cli" else text.replace("%%", "%")  # argparse's escape, for argparse only


def table(cls: type) -> dict[str, Entry]:
    return {e.name: e for e in entries(cls)}


def add_flags(parser: argparse.ArgumentParser | Any, cls: type, skip: Iterable[str] = ()) -> None:
    """One argparse option per setting with a flag (``skip``: field names the command adds itself)."""
    skipped = set(skip)
    every = table(cls)
    for e in every.values():
        if e.flag is None or e.name in skipped:
            continue
        s = e.setting
        kw: dict[str, Any] = {"dest": e.name, "help": render(s.flag_help or s.help, every, e.default, "cli")}
        if s.action:
            parser.add_argument(e.flag, action=s.action, **kw)
            continue
        default = e.default if s.cli_default is SAME else s.cli_default
        if s.required:
            kw["required"] = True
        else:
            kw["default"] = default
        parse = s.parse or (type(e.default) if isinstance(e.default, int | float | str)
                            and not isinstance(e.default, bool) else None)
        if s.read is not None:
            parse = None  # the text as written; from_args reads it
        if parse is not None:
            kw["type"] = parse
        if s.choices:
            kw["choices"] = s.choices
        if s.action_append:
            kw["action"] = "append"
        if s.metavar:
            kw["metavar"] = s.metavar
        parser.add_argument(e.flag, **kw)


def _read(e: Entry, value: Any) -> Any:
    return e.setting.read(value) if e.setting.read is not None and isinstance(value, str) else value


def from_args(cls: type, args: argparse.Namespace, **rest: Any) -> Any:
    """``cls`` from parsed flags (every setting with a flag) and ``rest`` (what the command derives)."""
    kw = {e.name: _read(e, getattr(args, e.name)) for e in entries(cls) if e.flag is not None and hasattr(args, e.name)}
    return cls(**{**kw, **rest})


def study_keys(cls: type) -> dict[str, str]:
    """Study-file key -> field name, for the settings a study file holds."""
    return {e.setting.key: e.name for e in entries(cls) if e.setting.key}


def from_section(cls: type, section: dict[str, Any], **rest: Any) -> Any:
    """``cls`` from a study file's section (its schema's defaults filled in) and ``rest``."""
    every = table(cls)
    kw = {name: _read(every[name], section[key]) for key, name in study_keys(cls).items() if key in section}
    return cls(**{**kw, **rest})


def schema_fields(cls: type) -> dict[str, dict[str, Any]]:
    """Study key -> the schema keywords the table owns: ``default``, ``description`` and the setting's
    own (bounds, an enum from ``choices``)."""
    every = table(cls)
    out: dict[str, dict[str, Any]] = {}
    for e in every.values():
        s = e.setting
        if not s.key:
            continue
        text = render(s.help, every, e.default, "study")
        if s.study_note:
            text = text.rstrip(".") + ". " + render(s.study_note, every, e.default, "study")
        d: dict[str, Any] = {"default": list(e.default) if isinstance(e.default, tuple) else e.default,
                             **({"enum": list(s.choices)} if s.choices else {}), **s.schema,
                             "description": text + ("" if text.endswith(".") else ".")}
        out[s.key] = d
    return out


def json_type(value: Any) -> Any:
    """The JSON Schema type of a default, for a key the schema file does not hold yet."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, list | tuple):
        return "array"
    return ["string", "null"] if value is None else "string"


def sync_section(section: dict[str, Any], cls: type) -> dict[str, Any]:
    """A schema section's ``properties`` with the table's keywords written in (a key the table has and
    the file lacks is added with a type from its default); the rest of the section is kept."""
    props = dict(section.get("properties", {}))
    for key, owned in schema_fields(cls).items():
        prop = dict(props.get(key) or {"type": json_type(owned["default"])})
        prop.pop("description", None)
        prop.update(owned)
        props[key] = prop
    return {**section, "properties": props}
