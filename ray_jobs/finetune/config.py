"""Settings of a fine-tuning study and the two ways of naming a training-set size.

A size is either a *reduction level* (drop r % of the fold's training images, per class — the paper's
0/25/50/75/90 %) or a number of *samples per class* ("5", "60", "all"). Both are resolved per fold to
a per-class count, so the same nested subset machinery serves them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ray_jobs.errors import CLIError

DEFAULT_REDUCTIONS = (0, 25, 50, 75, 90)
ALL = "all"


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


def parse_sizes(reductions: str | None = None, samples_per_class: str | None = None) -> list[SizeSpec]:
    """Sizes from ``--reductions 0,25`` or ``--samples-per-class 5,10,all`` (default: the paper's levels)."""
    out: list[SizeSpec] = []
    if samples_per_class:
        for tok in samples_per_class.split(","):
            tok = tok.strip().lower()
            if not tok:
                continue
            if tok == ALL:
                out.append(SizeSpec("per_class", -1))
                continue
            try:
                n = int(tok)
            except ValueError:
                raise CLIError(f"--samples-per-class: {tok!r} is not a whole number or 'all'") from None
            if n < 1:
                raise CLIError(f"--samples-per-class: {n} must be >= 1")
            out.append(SizeSpec("per_class", n))
    else:
        for tok in (reductions.split(",") if reductions else [str(r) for r in DEFAULT_REDUCTIONS]):
            tok = tok.strip().rstrip("%")
            if not tok:
                continue
            try:
                r = int(tok)
            except ValueError:
                raise CLIError(f"--reductions: {tok!r} is not a whole percentage") from None
            if not 0 <= r < 100:
                raise CLIError(f"--reductions: {r} must be in 0..99 (% of training images removed)")
            out.append(SizeSpec("reduction", r))
    if not out:
        raise CLIError("no training-set sizes given")
    return sorted(set(out), key=SizeSpec.sort_key)


@dataclass
class FinetuneConfig:
    data: str
    storage: str
    experiment: str
    encoders: list[str] = field(default_factory=lambda: ["random"])
    backbone: str = "resnet50"
    sizes: list[SizeSpec] = field(default_factory=lambda: parse_sizes())
    folds: int = 5
    seeds: list[int] = field(default_factory=lambda: [0])
    val_fraction: float = 0.2
    epochs: int = 70
    frozen_epochs: int = 10
    lr: float = 1e-4
    weight_decay: float = 5e-4
    batch_size: int = 64
    img_size: int | None = None
    in_chans: int | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int | None = None
    asha: bool = False
    search_target_auc: float | None = None
    search_margin: float | None = None
    search_candidates: list[int] | None = None
    address: str | None = None
    tracking_uri: str | None = None
    metrics_ci: int = 0
    fold_seed: int = 0  # seed of the patient-level fold assignment (same folds for every encoder)

    def validate(self) -> None:
        if self.folds < 2:
            raise CLIError(f"--folds must be >= 2, got {self.folds}")
        if not 0.0 < self.val_fraction < 0.5:
            raise CLIError(f"--val-fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.epochs < 1 or not 0 <= self.frozen_epochs <= self.epochs:
            raise CLIError(f"need --epochs >= 1 and 0 <= --frozen-epochs <= --epochs, got {self.epochs}, "
                           f"{self.frozen_epochs}")
        if self.batch_size < 1 or self.lr <= 0:
            raise CLIError(f"invalid --batch-size {self.batch_size} or --lr {self.lr}")
        if not self.encoders:
            raise CLIError("no --encoder given")
        if not self.seeds:
            raise CLIError("no --seeds given")
        if self.search_target_auc is not None and not 0.5 <= self.search_target_auc <= 1.0:
            raise CLIError(f"--search-target-auc must be in [0.5, 1], got {self.search_target_auc}")
        if self.search_margin is not None and not 0.0 <= self.search_margin < 1.0:
            raise CLIError(f"--search-margin must be in [0, 1), got {self.search_margin}")
        if not self.experiment:
            raise CLIError("--experiment must not be empty")

    @property
    def search_enabled(self) -> bool:
        return self.search_target_auc is not None or self.search_margin is not None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sizes"] = [s.label for s in self.sizes]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["sizes"] = [SizeSpec.from_label(x) if isinstance(x, str) else x for x in d.get("sizes", [])]
        return cls(**d)

    def as_params(self) -> dict[str, str]:
        return {k: json.dumps(v) if isinstance(v, list | dict) else str(v) for k, v in self.to_dict().items()}
