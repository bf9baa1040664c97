"""Rewrites the key table of docs/study-spec.md (between its ``keys:begin`` / ``keys:end`` markers)
from the study schema, leaving the rest of the page as written; ``make schema`` runs it."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from ray_jobs.study.spec import reference_markdown

PAGE = Path(__file__).resolve().parents[2] / "docs" / "study-spec.md"
_TABLE = re.compile(r"(<!-- keys:begin -->\n)(.*?)(\n<!-- keys:end -->)", re.S)


def rewrite(page: Path = PAGE) -> bool:
    """Put the schema's table into ``page``; True when the page changed."""
    text = page.read_text()
    if not _TABLE.search(text):
        raise SystemExit(f"{page}: no <!-- keys:begin --> ... <!-- keys:end --> markers")
    new = _TABLE.sub(lambda m: m.group(1) + reference_markdown().strip() + m.group(3), text, count=1)
    if new != text:
        page.write_text(new)
    return new != text


if __name__ == "__main__":
    print(f"{PAGE.name} {'updated' if rewrite() else 'unchanged'}")
    sys.exit(0)
