"""The user docs describe ctssl as it is: what it does, how to run it, measured figures and how to
reproduce them. Words of the development process (work sessions, numbered rounds, issue numbers,
targets declared met, superseded figures) and paths outside the repository do not belong there."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

HISTORY_PATTERNS = [
    (re.compile(r"\bsessions?\b", re.I), "development session"),
    (re.compile(r"\bissue\s*#?\s*\d", re.I), "issue number"),
    (re.compile(r"\bthe issue'?s\b", re.I), "reference to an issue"),
    (re.compile(r"\b(work )?round \d", re.I), "numbered work round"),
    (re.compile(r"\btarget\b.*\bmet\b", re.I), "target declared met"),
    (re.compile(r"\bsuperseded\b", re.I), "superseded figure"),
    (re.compile(r"\bpreviously\b", re.I), "before/after narration"),
    (re.compile(r"\.\./+shared\b"), "path outside the repository"),
    (re.compile(r"(?<![\w.])/work/"), "path outside the repository"),
    (re.compile(r"\bbench-out\b"), "path outside the repository"),
]


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_the_scanned_docs_exist() -> None:
    names = {p.relative_to(REPO).as_posix() for p in doc_files()}
    assert {"README.md", "docs/benchmarks.md", "docs/results.md", "docs/architecture.md"} <= names
    assert all(p.is_file() for p in doc_files())


def test_docs_hold_no_development_history() -> None:
    hits = []
    for path in doc_files():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for pattern, why in HISTORY_PATTERNS:
                if pattern.search(line):
                    hits.append(f"{path.relative_to(REPO).as_posix()}:{n}: {why}: {line.strip()[:120]}")
    assert hits == [], "development history in the user docs:\n" + "\n".join(hits)


def test_the_patterns_catch_what_they_are_for() -> None:
    def caught(text: str) -> bool:
        return any(p.search(text) for p, _ in HISTORY_PATTERNS)

    for bad in ("measured in session 2", "Target ratio >= 1.0: met for every method", "fixed in round 3",
                "see issue #12", "the issue's two configurations", "superseded by the idle run",
                "copy it to ../" + "shared/data", "written to /work/bench-out"):
        assert caught(bad), bad
    for good in ("best of 3 rounds", "--target-fraction F", "an earlier kept slice", "s3://bucket/work/x",
                 "issues a warning"):
        assert not caught(good), good
