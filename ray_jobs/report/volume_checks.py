"""The report's account of the volume checks of the data a study used, read from its prep manifests.

MLflow holds no prep results, so the study passes the URLs of the prep outputs it trained and
fine-tuned on; each manifest's ``volume_qc`` (see docs/data-format.md) gives the series flagged as no
regular volume and what prep did with them. A reader of the report can then tell whether any of the
slices behind its numbers came from a stack with missing slices, a tilted gantry or no volume at all.
"""

from __future__ import annotations

from ctssl_base.errors import UserError
from data_prep import shards
from data_prep.volume_qc import FLAGS, LABELS

SECTION = "Volume checks of the input series"

_DONE = {"warn": "written", "skip": "left out, listed as rejects", "strict": "none may be flagged"}


def volume_checks_markdown(manifests: dict[str, str]) -> str:
    """One bullet per data set (role -> prep output URL): its flagged series per flag and the policy."""
    lines = []
    for role, url in manifests.items():
        try:
            m = shards.read_manifest(url)
        except UserError:
            lines.append(f"- {role}: the prep manifest at `{url}` cannot be read")
            continue
        qc = m.get("volume_qc")
        if qc is None:
            lines.append(f"- {role} (`{url}`): no volume checks recorded (a prep output of an earlier ctssl)")
            continue
        series = qc.get("series", [])
        left_out = sum(1 for e in series if not e.get("written", True))
        read = m.get("counts", {}).get("series", 0) + left_out
        policy = qc.get("policy", "warn")
        counts = qc.get("counts", {})
        if not series:
            lines.append(f"- {role} (`{url}`): none of {read} series flagged (--volume-check {policy})")
            continue
        per = ", ".join(f"{counts[k]} {LABELS[k]}" for k in FLAGS if counts.get(k))
        lines.append(f"- {role} (`{url}`): **{len(series)} of {read} series flagged** ({per}; "
                     f"--volume-check {policy}: {_DONE.get(policy, policy)})")
    return "\n".join(lines)
