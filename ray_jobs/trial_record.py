"""What a fine-tuning trial records and the report reads: the contract between ``ray_jobs.finetune``,
which writes trials, and ``ray_jobs.report``, which reads them back from MLflow.

Both sides name a training-set size the same way (:class:`SizeSpec` and its label, e.g. ``n5``,
``all``, ``r25``, stored in each trial's ``size`` tag) and find a trial's test predictions under the
same artifact path (:data:`PREDICTIONS_ARTIFACT`). Keeping them here lets the report depend on this
module alone, not on the fine-tuning code.
"""

from __future__ import annotations

from dataclasses import dataclass

#: where every trial logs its test labels, class probabilities, row numbers and patient pseudonyms
PREDICTIONS_ARTIFACT = "predictions/test.npz"


@dataclass(frozen=True, order=True)
class SizeSpec:
    """``kind`` "reduction" (value = % removed) or "per_class" (value = images per class, -1 = all)."""

    kind: str
    value: int

    @property
    def label(self) -> str:
        if self.kind == "reduction":
            return f"r{self.value}"
        return "all" if self.value < 0 else f"n{self.value}"

    @property
    def is_full(self) -> bool:
        return (self.kind == "reduction" and self.value == 0) or (self.kind == "per_class" and self.value < 0)

    def per_class_count(self, available: int) -> int:
        """How many of ``available`` images of one class this size keeps (at least one)."""
        if self.kind == "reduction":
            return max(1, int(round(available * (100 - self.value) / 100.0)))
        return available if self.value < 0 else min(available, self.value)

    def sort_key(self) -> float:
        """Larger training set = larger key, across both kinds."""
        if self.kind == "reduction":
            return 100.0 - self.value
        return float("inf") if self.value < 0 else float(self.value)

    @classmethod
    def from_label(cls, label: str) -> SizeSpec:
        if label == "all":
            return cls("per_class", -1)
        if label[:1] == "r":
            return cls("reduction", int(label[1:]))
        if label[:1] == "n":
            return cls("per_class", int(label[1:]))
        raise ValueError(f"not a size label: {label!r}")


__all__ = ["PREDICTIONS_ARTIFACT", "SizeSpec"]
