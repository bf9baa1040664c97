"""Settings of a fine-tuning study and the two ways of naming a training-set size.

A size is either a *reduction level* (drop r % of the fold's training images, per class — the paper's
0/25/50/75/90 %) or a number of *samples per class* ("5", "60", "all"). Both are resolved per fold to
a per-class count, so the same nested subset machinery serves them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ctssl_base.errors import UserError
from ray_jobs.names import check_experiment_name
from ray_jobs.tracking import check_tags
from ray_jobs.trial_record import SizeSpec
from ssl_core.finetune_recipe import FineTuneRecipe

DEFAULT_REDUCTIONS = (0, 25, 50, 75, 90)
ALL = "all"

#: how each encoder's fine-tuning recipe is set: chosen per trial on the validation split from a grid
#: ("tuned", the default: a fixed recipe handicaps whichever encoder it does not suit, most often the
#: random baseline), or one given recipe for every encoder ("fixed": the papers' protocol)
PROTOCOLS = ("tuned", "fixed")
DEFAULT_LRS = (1e-3, 1e-4)
#: how long each recipe trains: until validation stops improving ("early", the default: ``epochs`` is
#: the maximum), or exactly ``epochs`` ("fixed": the papers' protocol). A fixed count set for speed
#: leaves some encoders (most often the random baseline) further from their best than others, and the
#: comparison then moves with the count
STOPPINGS = ("early", "fixed")
DEFAULT_PATIENCE = 10
DEFAULT_MIN_DELTA = 0.001
#: the papers' share of frozen-backbone epochs (10 of 70): the "linear probe, then fine-tune" recipe
FROZEN_SHARE = 1 / 7


@dataclass(frozen=True)
class Recipe:
    """One fine-tuning recipe: Adam learning rate and epochs with the backbone frozen first."""

    lr: float
    frozen_epochs: int

    @property
    def label(self) -> str:
        return f"lr {self.lr:g}, {self.frozen_epochs} frozen"

    def to_text(self) -> str:
        return f"{self.lr:g}:{self.frozen_epochs}"

    @classmethod
    def from_text(cls, text: str) -> Recipe:
        lr, _, frozen = text.partition(":")
        return cls(float(lr), int(frozen or 0))


def default_recipes(epochs: int) -> list[Recipe]:
    """Two learning rates x (full fine-tuning from the start, or head-only first for 1/7 of the epochs)."""
    frozen = max(1, round(epochs * FROZEN_SHARE)) if epochs > 1 else 0
    shares = sorted({0, frozen})
    return [Recipe(lr, f) for lr in DEFAULT_LRS for f in shares]


def parse_recipes(text: str | None) -> list[Recipe] | None:
    """``--recipes 1e-3:0,1e-4:10`` (lr:frozen_epochs, comma-separated) -> recipes; None: the default grid."""
    if text is None or not text.strip():
        return None
    out: list[Recipe] = []
    for tok in text.split(","):
        tok = tok.strip()
        if not tok:
            continue
        try:
            r = Recipe.from_text(tok)
        except ValueError:
            raise UserError(f"--recipes: {tok!r} is not LR:FROZEN_EPOCHS (e.g. 1e-3:0)") from None
        if not r.lr > 0 or r.frozen_epochs < 0:
            raise UserError(f"--recipes: {tok!r} needs lr > 0 and frozen epochs >= 0")
        if r not in out:
            out.append(r)
    if not out:
        raise UserError("--recipes: no recipe given")
    return out


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
                raise UserError(f"--samples-per-class: {tok!r} is not a whole number or 'all'") from None
            if n < 1:
                raise UserError(f"--samples-per-class: {n} must be >= 1")
            out.append(SizeSpec("per_class", n))
    else:
        for tok in (reductions.split(",") if reductions else [str(r) for r in DEFAULT_REDUCTIONS]):
            tok = tok.strip().rstrip("%")
            if not tok:
                continue
            try:
                r = int(tok)
            except ValueError:
                raise UserError(f"--reductions: {tok!r} is not a whole percentage") from None
            if not 0 <= r < 100:
                raise UserError(f"--reductions: {r} must be in 0..99 (% of training images removed)")
            out.append(SizeSpec("reduction", r))
    if not out:
        raise UserError("no training-set sizes given")
    return sorted(set(out), key=SizeSpec.sort_key)


#: the defaults of one fine-tuning run (ssl_core's recipe)
RECIPE = FineTuneRecipe()


@dataclass
class FinetuneConfig:
    data: str
    storage: str
    experiment: str
    encoders: list[str] = field(default_factory=lambda: ["random"])
    backbone: str | None = None  # random baseline's network; None: the pre-trained encoders' (resnet50 alone)
    sizes: list[SizeSpec] = field(default_factory=lambda: parse_sizes())
    folds: int = 5
    seeds: list[int] = field(default_factory=lambda: [0])
    val_fraction: float = 0.2
    # one fine-tuning run's recipe: the defaults are ssl_core's (the papers' recipe), written once there
    epochs: int = RECIPE.epochs
    frozen_epochs: int = RECIPE.frozen_epochs
    lr: float = RECIPE.lr
    weight_decay: float = RECIPE.weight_decay
    batch_size: int = RECIPE.batch_size
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
    protocol: str = "tuned"
    recipes: list[str] | None = None  # "lr:frozen" texts for "tuned"; None: default_recipes(epochs)
    bn_recalibrate: bool = True  # re-estimate batch-norm statistics on the training images before each evaluation
    stopping: str = "early"
    patience: int = DEFAULT_PATIENCE  # "early": epochs without a validation AUC gain, after the backbone unfreezes
    min_delta: float = DEFAULT_MIN_DELTA  # "early": the smallest validation AUC gain that counts as one
    #: "early": a recipe still improving at ``epochs`` continues once for at most this many more epochs
    #: (None: ``epochs`` more, i.e. the maximum doubles once; 0: never, the cell is reported unconverged)
    extend_epochs: int | None = None
    #: encoder name -> extra tags on each of its trial runs (e.g. {"reduction": "hash6"}); the tags the
    #: report reads (ctssl.kind, method = the encoder name, size, fold, ...) are the study's own and win
    encoder_tags: dict[str, dict[str, str]] = field(default_factory=dict)

    def validate(self) -> None:
        if self.folds < 2:
            raise UserError(f"--folds must be >= 2, got {self.folds}")
        if not 0.0 < self.val_fraction < 0.5:
            raise UserError(f"--val-fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.epochs < 1 or (self.protocol == "fixed" and not 0 <= self.frozen_epochs <= self.epochs):
            raise UserError(f"need --epochs >= 1 and 0 <= --frozen-epochs <= --epochs, got {self.epochs}, "
                            f"{self.frozen_epochs}")
        if self.batch_size < 1 or self.lr <= 0:
            raise UserError(f"invalid --batch-size {self.batch_size} or --lr {self.lr}")
        if not self.encoders:
            raise UserError("no --encoder given")
        if not self.seeds:
            raise UserError("no --seeds given")
        if self.search_target_auc is not None and not 0.5 <= self.search_target_auc <= 1.0:
            raise UserError(f"--search-target-auc must be in [0.5, 1], got {self.search_target_auc}")
        if self.search_margin is not None and not 0.0 <= self.search_margin < 1.0:
            raise UserError(f"--search-margin must be in [0, 1), got {self.search_margin}")
        check_experiment_name(self.experiment)  # names the Tune runs' folders under --storage
        if self.protocol not in PROTOCOLS:
            raise UserError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.protocol == "fixed" and self.recipes:
            raise UserError("--recipes is the grid of --protocol tuned; --protocol fixed uses --lr and --frozen-epochs")
        for r in self.recipe_grid():
            if r.frozen_epochs > self.epochs:
                raise UserError(f"recipe '{r.to_text()}' freezes the backbone for {r.frozen_epochs} epochs, "
                                f"more than --epochs {self.epochs}")
        if not isinstance(self.encoder_tags, dict):
            raise UserError(f"encoder_tags must map encoder names to tag mappings, got {self.encoder_tags!r}")
        for name, tags in self.encoder_tags.items():
            check_tags(tags, f"encoder_tags[{name!r}]")
        if self.stopping not in STOPPINGS:
            raise UserError(f"--stopping must be one of {', '.join(STOPPINGS)}, got {self.stopping!r}")
        if not isinstance(self.patience, int) or self.patience < 1:
            raise UserError(f"--patience must be a whole number of epochs >= 1, got {self.patience!r}")
        if not 0.0 <= self.min_delta < 1.0:
            raise UserError(f"--min-delta must be in [0, 1) (an AUC gain), got {self.min_delta}")
        if self.extend_epochs is not None and self.extend_epochs < 0:
            raise UserError(f"--extend-epochs must be >= 0, got {self.extend_epochs}")
        if self.protocol == "tuned" and self.asha:
            raise UserError("--asha needs --protocol fixed: with a tuned recipe every trial trains several "
                            "recipes in turn, which ASHA's per-epoch rungs cannot compare")
        if self.asha and self.stopping != "fixed":
            raise UserError("--asha needs --stopping fixed: ASHA compares trials at fixed epoch counts, and a "
                            "recipe that stops on validation or continues past --epochs ends at its own count")

    def recipe_grid(self) -> list[Recipe]:
        """The recipes a trial trains: the grid (tuned) or the one given recipe (fixed)."""
        if self.protocol == "fixed":
            return [Recipe(self.lr, self.frozen_epochs)]
        if self.recipes:
            return [Recipe.from_text(t) for t in self.recipes]
        return default_recipes(self.epochs)

    @property
    def extension(self) -> int:
        """Extra epochs a still-improving recipe may get once ("early" only)."""
        if self.stopping != "early":
            return 0
        return self.epochs if self.extend_epochs is None else self.extend_epochs

    @property
    def epoch_limit(self) -> int:
        """The most epochs one recipe can train, extension included."""
        return self.epochs + self.extension

    def stopping_kwargs(self) -> dict[str, Any]:
        """The :class:`ssl_core.finetune_recipe.FineTuneRecipe` fields of the stopping rule."""
        if self.stopping == "fixed":
            return {"patience": None, "min_delta": 0.0, "extend_epochs": 0}
        return {"patience": self.patience, "min_delta": self.min_delta, "extend_epochs": self.extension}

    def stopping_text(self) -> str:
        """How long each recipe trained, in words for the report."""
        if self.stopping == "fixed":
            return (f"fixed length: every recipe trains exactly {self.epochs} epochs (the papers' protocol); "
                    "a run whose best validation epoch is in its last 10 % counts as unconverged")
        ext = (f"; a recipe still improving at the maximum continues once, to at most {self.epoch_limit} epochs"
               if self.extension else "; no extension")
        unit = "epoch" if self.patience == 1 else "epochs"
        return (f"until validation stops improving: each recipe stops after {self.patience} {unit} without a "
                f"validation AUC gain above {self.min_delta:g} (counted once the backbone is unfrozen), at most "
                f"{self.epochs} epochs{ext}; the same rule for every encoder and the random baseline")

    def protocol_text(self) -> str:
        """How the recipe was set, in words for the report."""
        if self.protocol == "fixed":
            return (f"fixed recipe for every encoder (lr {self.lr:g}, backbone frozen for {self.frozen_epochs} "
                    f"of {self.epochs} epochs), not tuned per encoder")
        grid = "; ".join(r.label for r in self.recipe_grid())
        length = f"at most {self.epochs}" if self.stopping == "early" else str(self.epochs)
        return (f"tuned: each trial trains every recipe of the grid ({grid}; {length} epochs) and keeps "
                "the one with the best validation AUC; the test split plays no part in the choice")

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
