"""The study spec (``apiVersion: ctssl/v1``, ``kind: Study``): loading, checking and defaults.

``study.schema.json`` beside this module is the one definition of the format: the loader validates
against it, fills in its defaults, and the docs' key reference is checked against it by a test. The
schema cannot say everything (a duration that parses, recipes that fit the epochs, backbones that
match), so :func:`check_semantics` adds those rules; every error names the file, the line and column
of the offending key and its dotted path, so a typo costs one line to find.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from ctssl_base.errors import UserError
from ray_jobs.finetune.config import parse_recipes
from ray_jobs.pretrain.config import parse_duration
from ssl_core.methods import METHOD_NAMES

SCHEMA_FILE = Path(__file__).with_name("study.schema.json")
API_VERSION = "ctssl/v1"
PHANTOM_KEYS = ("patients", "slices", "renderSize", "task")
#: the longest pre-training budget a study may give (30 days; the schema's description says 720h)
MAX_TIME_BUDGET_S = 30 * 24 * 3600


class SpecError(UserError):
    """One or more problems of a study file, one line each (``FILE:LINE:COL: key.path: what``)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@cache
def schema() -> dict[str, Any]:
    """The study schema: the file beside this module with the method names and the default (every
    method) filled in from the methods registry, so a new method module needs no edit here."""
    sch = json.loads(SCHEMA_FILE.read_text())
    methods = sch["properties"]["spec"]["properties"]["pretrain"]["properties"]["methods"]
    methods["propertyNames"] = {"enum": method_names()}
    methods["default"] = {m: {} for m in method_names()}
    return sch


def method_names() -> list[str]:
    """The pre-training methods a study can name: the methods package's modules (listed, not imported:
    no torch here)."""
    return list(METHOD_NAMES)


# ------------------------------------------------------------------------------ parsing
class AliasRefused(yaml.MarkedYAMLError):
    """A study file used a YAML anchor or alias (``&name`` / ``*name``, also the ``<<: *name`` merge)."""


class _NoAliasLoader(yaml.SafeLoader):
    """The safe loader, refusing anchors and aliases as it composes, before anything is expanded.

    An alias makes a node appear again without its text: nine levels of nine references (a few hundred
    bytes, "billion laughs") stand for 9**9 values that validating, defaulting or dumping the study
    would walk one by one. A study file needs no sharing, so the first anchor or alias ends the parse.
    """

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            kind = "alias *" if isinstance(event, yaml.AliasEvent) else "anchor &"
            raise AliasRefused(problem=f"YAML anchors and aliases are not allowed in a study file "
                                       f"(found {kind}{event.anchor}); write the value out",
                               problem_mark=event.start_mark)
        return super().compose_node(parent, index)


def _parse(text: str) -> tuple[yaml.Node | None, Any]:
    """(the composed document, its Python value) in one pass of the alias-refusing loader."""
    loader = _NoAliasLoader(text)
    try:
        root = loader.get_single_node()
        return root, (loader.construct_document(root) if root is not None else None)
    finally:
        loader.dispose()


# ------------------------------------------------------------------------------ locations in the YAML
def _key_node(root: yaml.Node | None, path: list[str | int]) -> yaml.Node | None:
    """The node to point at for ``path``: a mapping's key (not its value), a sequence's item, or the
    deepest node that exists when the path goes further than the document (a missing key)."""
    node, at = root, root
    for part in path:
        if isinstance(node, yaml.MappingNode):
            hit = next(((k, v) for k, v in node.value if k.value == part), None)
            if hit is None:
                return at
            at, node = hit
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            at = node = node.value[part]
        else:
            return at
    return at


def _where(source: str, root: yaml.Node | None, path: list[str | int]) -> str:
    node = _key_node(root, path)
    if node is None:
        return source
    return f"{source}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"


def dotted(path: list[str | int]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


# ------------------------------------------------------------------------------ schema errors
def _describe(err: Any) -> tuple[list[str | int], str]:
    """(path of the key to point at, message) for one jsonschema error, worded for a person."""
    path = list(err.absolute_path)
    v = err.validator
    if v == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed)) if isinstance(err.instance, dict) else []
        name = extra[0] if extra else "?"
        return [*path, name], f"unknown key {name!r} (allowed: {', '.join(allowed)})"
    if v == "required":
        missing = err.message.split("'")[1] if "'" in err.message else err.message
        return path, f"missing required key {missing!r}"
    if "propertyNames" in err.schema_path:
        bad = err.instance
        allowed = err.schema.get("enum") or []
        where = [*path, bad] if isinstance(bad, str) else path
        return where, f"unknown name {bad!r} (choose from {', '.join(allowed)})"
    if v in ("enum", "const"):
        allowed = err.schema.get("enum") or [err.schema.get("const")]
        return path, f"{err.instance!r} is not one of {', '.join(map(repr, allowed))}"
    if v == "oneOf" and isinstance(err.schema.get("oneOf"), list):
        over = next((c for c in err.context if c.validator == "maximum"), None)
        if over is not None:  # the right type, only too large: say that, not the list of choices
            return path, f"{_short(err.instance)} is above the maximum of {over.validator_value}"
        choices = []
        for s in err.schema["oneOf"]:
            choices.append(repr(s["const"]) if "const" in s else s.get("type", "?"))
            if "minimum" in s:
                choices[-1] += f" >= {s['minimum']}"
        return path, f"{err.instance!r} must be one of: {', '.join(map(str, choices))}"
    if v == "type":
        want = err.validator_value
        want = " or ".join(want) if isinstance(want, list) else want
        return path, f"{_short(err.instance)} is not of type {want}"
    if v == "maximum":  # the limits are far above any real study: this is a typo, caught before any work
        return path, f"{_short(err.instance)} is above the maximum of {err.validator_value}"
    if v == "exclusiveMaximum":
        return path, f"{_short(err.instance)} must be less than {err.validator_value}"
    if v in ("maxItems", "maxProperties", "maxLength"):
        what = {"maxItems": "items", "maxProperties": "keys", "maxLength": "characters"}[v]
        return path, f"{len(err.instance)} {what}, at most {err.validator_value} allowed"
    return path, err.message if len(err.message) <= 200 else err.message[:197] + "..."


def _short(value: Any) -> str:
    """``repr(value)``, cut to a length that keeps an error on one readable line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _schema_problems(data: Any, source: str, root: yaml.Node | None) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema())
    found: dict[str, tuple[int, int]] = {}
    for err in validator.iter_errors(data):
        path, msg = _describe(err)
        node = _key_node(root, path)
        pos = (node.start_mark.line, node.start_mark.column) if node is not None else (0, 0)
        found.setdefault(f"{_where(source, root, path)}: {dotted(path)}: {msg}", pos)
    return sorted(found, key=found.__getitem__)  # in the order of the file


# ------------------------------------------------------------------------------ defaults
def apply_defaults(data: Any, sch: dict[str, Any] | None = None) -> Any:
    """``data`` with every missing key that has a schema default filled in (recursively)."""
    sch = schema() if sch is None else sch
    sch = _resolve_ref(sch)
    if isinstance(data, dict) and ("properties" in sch or isinstance(sch.get("additionalProperties"), dict)):
        out = dict(data)
        props = sch.get("properties", {})
        for key, sub in props.items():
            sub = _resolve_ref(sub)
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
            if key in out:
                out[key] = apply_defaults(out[key], sub)
        extra = sch.get("additionalProperties")
        if isinstance(extra, dict):
            for key in out:
                if key not in props and out[key] is not None:
                    out[key] = apply_defaults(out[key], extra)
        return out
    return data


def _resolve_ref(sch: Any) -> Any:
    if isinstance(sch, dict) and "$ref" in sch:
        name = sch["$ref"].rsplit("/", 1)[-1]
        return {**schema()["$defs"][name], **{k: v for k, v in sch.items() if k != "$ref"}}
    return sch


# ------------------------------------------------------------------------------ the study
@dataclass
class Study:
    """A checked study spec with its defaults filled in (``raw``: the document as written)."""

    name: str
    spec: dict[str, Any]
    raw: dict[str, Any]
    source: str = "<study>"

    @property
    def storage(self) -> str:
        return self.spec["storage"].rstrip("/")

    @property
    def workdir(self) -> Path:
        return Path(self.spec["workdir"] or f"ctssl-{self.name}")

    def methods(self) -> list[str]:
        return list(self.spec["pretrain"]["methods"])

    def method_settings(self, method: str) -> dict[str, Any]:
        """The pre-training settings of one method: the study's, overridden by the method's own."""
        pre = self.spec["pretrain"]
        own = pre["methods"].get(method) or {}
        keys = ("backbone", "epochs", "timeBudget", "maxSteps", "batch")
        return {**{k: pre[k] for k in keys}, **{k: own[k] for k in keys if k in own},
                "options": dict(own.get("options") or {})}

    def budget_sizes(self) -> list[int]:
        """The labelled sizes (images per class) the budget curve is evaluated at: ``pretrain.budgetSizes``,
        else the smallest integer size of ``finetune.samplesPerClass``."""
        return list(self.spec["pretrain"].get("budgetSizes")
                    or [min(n for n in self.spec["finetune"]["samplesPerClass"] if isinstance(n, int))])

    def levels(self) -> list[int | None]:
        return list(self.spec["reduction"]["levels"])

    def level_label(self, level: int | None) -> str:
        return "all" if level is None else f"{self.spec['reduction']['strategy']}{level}"

    def encoder_name(self, method: str, level: int | None) -> str:
        """``byol`` when the study has one pre-training level, else ``byol-all`` / ``byol-hash6``."""
        return method if len(self.levels()) == 1 else f"{method}-{self.level_label(level)}"

    def dump(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False)


def check_semantics(study: Study, root: yaml.Node | None = None) -> list[str]:
    """The rules the schema cannot express; each problem names the key."""

    found: list[tuple[tuple[int, int], str]] = []
    spec = study.spec

    def bad(path: list[str | int], msg: str) -> None:
        node = _key_node(root, path)
        pos = (node.start_mark.line, node.start_mark.column) if node is not None else (0, 0)
        found.append((pos, f"{_where(study.source, root, path)}: {dotted(path)}: {msg}"))

    pre = spec["pretrain"]
    budget_paths = [(["spec", "pretrain", "timeBudget"], pre.get("timeBudget"))]
    budget_paths += [(["spec", "pretrain", "methods", m, "timeBudget"], (o or {}).get("timeBudget"))
                     for m, o in pre["methods"].items()]
    for path, text in budget_paths:
        if text is not None:
            try:
                seconds = parse_duration(text, flag="timeBudget")
            except UserError as e:
                bad(path, str(e).replace("timeBudget ", "", 1))
                continue
            if seconds > MAX_TIME_BUDGET_S:
                bad(path, f"{_short(text)} is above the maximum of {MAX_TIME_BUDGET_S // 3600}h")
    ft = spec["finetune"]
    if ft["recipes"] is not None:
        try:
            recipes = parse_recipes(",".join(ft["recipes"])) or []
        except UserError as e:
            bad(["spec", "finetune", "recipes"], str(e).replace("--recipes: ", ""))
            recipes = []
        for i, r in enumerate(recipes):
            if r.frozen_epochs > ft["epochs"]:
                bad(["spec", "finetune", "recipes", i],
                    f"{r.to_text()} freezes more epochs than finetune.epochs ({ft['epochs']})")
    if ft["protocol"] == "fixed" and ft["frozenEpochs"] > ft["epochs"]:
        bad(["spec", "finetune", "frozenEpochs"], f"{ft['frozenEpochs']} is more than finetune.epochs ({ft['epochs']})")
    backbones = {study.method_settings(m)["backbone"] for m in study.methods()}
    if len(backbones) > 1 and ft["backbone"] is None and ft["random"]:
        bad(["spec", "finetune", "backbone"], f"the methods use different backbones ({', '.join(sorted(backbones))}): "
            "name the random baseline's network here")
    for role in ("pretrain", "labelled"):
        src = spec["data"][role]
        if src["type"] == "phantom":
            for key in ("patients", "slices"):
                if key not in src:
                    bad(["spec", "data", role], f"a phantom source needs {key!r}")
            for key in ("path", "labels"):
                if key in src:
                    bad(["spec", "data", role, key], "a phantom source is generated by the study: no path or labels")
        else:
            if "path" not in src:
                bad(["spec", "data", role], f"a {src['type']} source needs 'path'")
            for key in PHANTOM_KEYS:
                if key in src:
                    bad(["spec", "data", role, key], f"applies to phantom sources only, not {src['type']}")
        if role == "labelled" and src["type"] in ("dicom", "nifti", "imagefolder") and "labels" not in src:
            bad(["spec", "data", role], f"a labelled {src['type']} source needs 'labels' (a CSV)")
        if role == "pretrain" and src["type"] == "phantom" and "task" in src:
            bad(["spec", "data", role, "task"], "the pre-training pool carries no labels")
    return [line for _, line in sorted(found, key=lambda f: f[0])]  # in the order of the file


def loads(text: str, source: str = "<study>") -> Study:
    """Parse, validate and complete a study document; :class:`SpecError` lists every problem."""
    try:
        root, data = _parse(text)
    except AliasRefused as e:
        mark = e.problem_mark
        raise SpecError([f"{source}:{mark.line + 1}:{mark.column + 1}: {e.problem}"]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise SpecError([f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})"]) from None
    if not isinstance(data, dict):
        raise SpecError([f"{source}: a study file is a YAML mapping with apiVersion, kind, metadata and spec"])
    problems = _schema_problems(data, source, root)
    if problems:
        raise SpecError(problems)
    full = apply_defaults(data)
    study = Study(name=full["metadata"]["name"], spec=full["spec"], raw=data, source=source)
    problems = check_semantics(study, root)
    if problems:
        raise SpecError(problems)
    return study


def load(path: str | Path) -> Study:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise SpecError([f"{path}: study file not found"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError([f"{path}: cannot be read ({e})"]) from None
    return loads(text, str(path))


def from_dict(data: dict[str, Any], source: str = "<study>") -> Study:
    """A study from an in-memory document (the demo's overrides, the chart's values)."""
    return loads(yaml.safe_dump(data, sort_keys=False), source)


# ------------------------------------------------------------------------------ the key reference
def _type_text(sch: dict[str, Any]) -> str:
    sch = _resolve_ref(sch)
    if "const" in sch:
        return json.dumps(sch["const"])
    if "enum" in sch:
        return " \\| ".join(json.dumps(v) for v in sch["enum"])
    if "oneOf" in sch:
        return " \\| ".join(_type_text(s) for s in sch["oneOf"])
    types = sch.get("type", "any")
    types = list(types) if isinstance(types, list) else [types]
    limits = _range_text(sch)
    for i, name in enumerate(types):
        if name in ("integer", "number") and limits:
            types[i] = f"{name} ({limits})"
        elif name == "array" and "items" in sch:
            most = f" (at most {sch['maxItems']})" if "maxItems" in sch else ""
            types[i] = f"list{most} of {_type_text(sch['items'])}"
    return " \\| ".join(types)


def _range_text(sch: dict[str, Any]) -> str:
    """``1 to 100000``, ``> 0, < 0.5`` or ``>= 0``: the bounds of a number, shown in the key table so that
    the limits a value is checked against are where a user looks them up."""
    if "minimum" in sch and "maximum" in sch:
        return f"{sch['minimum']} to {sch['maximum']}"
    low = (f">= {sch['minimum']}" if "minimum" in sch
           else f"> {sch['exclusiveMinimum']}" if "exclusiveMinimum" in sch else "")
    high = (f"<= {sch['maximum']}" if "maximum" in sch
            else f"< {sch['exclusiveMaximum']}" if "exclusiveMaximum" in sch else "")
    return ", ".join(b for b in (low, high) if b)


def reference_rows(sch: dict[str, Any] | None = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) for every key of the format, depth first, in schema order."""
    sch = _resolve_ref(schema() if sch is None else sch)
    rows = []
    for key, sub in sch.get("properties", {}).items():
        sub = _resolve_ref(sub)
        path = f"{prefix}{key}"
        default = json.dumps(sub["default"]) if "default" in sub else ("required" if key in sch.get("required", [])
                                                                        else "")
        rows.append((path, _type_text(sub), default, sub.get("description", "")))
        if "properties" in sub:
            rows += reference_rows(sub, f"{path}.")
        extra = sub.get("additionalProperties")
        if isinstance(extra, dict) and "$ref" in extra:
            rows += reference_rows(extra, f"{path}.<name>.")
    return rows


def reference_markdown() -> str:
    """The key table of docs/study-spec.md (a test keeps the page equal to it)."""
    lines = ["| key | type | default | what it is |", "|---|---|---|---|"]
    for key, typ, default, desc in reference_rows():
        lines.append(f"| `{key}` | {typ} | {f'`{default}`' if default and default != 'required' else default} "
                     f"| {desc.replace('|', '/')} |")
    return "\n".join(lines)
