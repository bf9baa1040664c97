"""Settings of a fine-tuning study and the two ways of naming a training-set size.

A size is either a *reduction level* (drop r % of the fold's training images, per class — the paper's
0/25/50/75/90 %) or a number of *samples per class* ("5", "60", "all"). Both are resolved per fold to
a per-class count, so the same nested subset machinery serves them.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ctssl_base.errors import UserError
from ctssl_base.settings import from_section, setting, study_keys
from ray_jobs.names import check_experiment_name
from ray_jobs.tracking import check_tags
from ray_jobs.trial_record import SizeSpec
from ssl_core.finetune_recipe import FineTuneRecipe

#: the training-set sizes of a fine-tuning study when none are given, for ``ctssl finetune`` and a study
#: file alike: images per class, the few-label range the papers' question is about, then all of them
DEFAULT_SAMPLES_PER_CLASS: tuple[int | str, ...] = (5, 10, 20, 40, "all")
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


def int_list(text: str) -> list[int]:
    """``1,2,3`` -> [1, 2, 3] (an argparse type: a bad item is the flag's error)."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def recipe_texts(text: str) -> list[str]:
    """``1e-3:0,1e-4:4`` -> the recipes' canonical texts, checked (an argparse type, as :func:`int_list`)."""
    try:
        return [r.to_text() for r in parse_recipes(text) or []]
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--recipes: ")) from None


def parse_sizes(reductions: str | None = None, samples_per_class: str | None = None) -> list[SizeSpec]:
    """Sizes from ``--reductions 0,25`` or ``--samples-per-class 5,10,all`` (default: the paper's levels)."""
    out: list[SizeSpec] = []
    if not reductions and not samples_per_class:
        samples_per_class = ",".join(map(str, DEFAULT_SAMPLES_PER_CLASS))
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
        for tok in reductions.split(","):
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
    """The settings of a fine-tuning study: the one table ``ctssl finetune``'s flags, a study file's
    ``finetune`` keys, the schema's defaults and the help text are made from (:mod:`ctssl_base.settings`)."""

    data: str = setting(required=True, metavar="URL", help="labelled prep output (local path or s3://)")
    storage: str = setting(required=True, metavar="URL", help="Ray Tune results folder (local or s3://)")
    experiment: str = setting(required=True, metavar="NAME", help="study name (MLflow experiment)")
    encoders: list[str] = setting(
        default_factory=lambda: ["random"], flag="--encoder", action_append=True, cli_default=None,
        metavar="[NAME=]SOURCE", help="random | checkpoint/encoder folder | runs:/RUN_ID (repeatable; default: random)")
    backbone: str | None = setting(
        None, key="backbone", metavar="NAME",
        help="the random-init baseline's timm network (default: the pre-trained encoders' backbone; resnet50 when "
             "random is the only encoder)")
    sizes: list[SizeSpec] = field(default_factory=lambda: parse_sizes())  # samplesPerClass / the CLI's two flags
    folds: int = setting(5, key="folds", schema={"minimum": 2, "maximum": 100},
                         help="patient-level stratified folds (default {default})")
    seeds: list[int] = setting(
        default_factory=lambda: [0], key="seeds", parse=int_list, metavar="S1,S2",
        help="seeds of each (encoder, size, fold) cell: its training subset and initialisation (default {default}); "
             "more seeds, tighter intervals")
    val_fraction: float = setting(
        0.2, key="valFraction", schema={"exclusiveMinimum": 0, "exclusiveMaximum": 0.5},
        help="share of each fold's training patients held out for validation: the best epoch and the recipe are "
             "chosen on it (default {default})")
    # one fine-tuning run's recipe: the defaults are ssl_core's (the papers' recipe), written once there
    epochs: int = setting(
        RECIPE.epochs, key="epochs", schema={"minimum": 1, "maximum": 10000},
        help="epochs per recipe: the maximum with {stopping} early, the exact count with {stopping} fixed "
             "(default {default})")
    frozen_epochs: int = setting(
        RECIPE.frozen_epochs, key="frozenEpochs", schema={"minimum": 0, "maximum": 10000},
        help="with {protocol} fixed: epochs with the backbone frozen (default {default})")
    lr: float = setting(RECIPE.lr, key="lr", schema={"exclusiveMinimum": 0, "maximum": 10},
                        help="with {protocol} fixed: Adam learning rate (default {default})")
    weight_decay: float = setting(RECIPE.weight_decay, help="Adam weight decay (default {default})")
    batch_size: int = setting(RECIPE.batch_size, key="batch", schema={"minimum": 1, "maximum": 65536},
                              help="fine-tuning batch (default {default})")
    img_size: int | None = setting(None, parse=int, metavar="S",
                                   help="fine-tuning resolution (default: the shards' size)")
    in_chans: int | None = setting(None, parse=int, choices=(1, 3), help="default: the encoder's (1 for random)")
    cpus_per_trial: float = setting(1.0, help="CPUs per Tune trial (default {default})")
    gpus_per_trial: float = setting(0.0, help="GPUs per Tune trial (default {default})")
    max_concurrent: int | None = setting(None, parse=int, metavar="N",
                                         help="trials at once (default: as many as the cluster's resources allow)")
    asha: bool = setting(False, action="store_true",
                         help="stop weak trials early (ASHA on validation AUC); a stopped trial has no test metrics: "
                              "the report names it and leaves it out of the means")
    search_target_auc: float | None = setting(None, parse=float, metavar="AUC",
                                              help="search the smallest samples-per-class reaching this mean test AUC")
    search_margin: float | None = setting(
        None, parse=float, metavar="DELTA",
        help="search the smallest samples-per-class within DELTA of the full-data AUC")
    search_candidates: list[int] | None = setting(
        None, parse=int_list, metavar="NS",
        help="samples-per-class values the search may try (default 5..200 on a x1.5 ladder)")
    address: str | None = setting(None, metavar="ADDR", help="Ray cluster (default: $RAY_ADDRESS, else local)")
    tracking_uri: str | None = setting(
        None, metavar="URI", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else SQLite under a local "
                                  "--storage)")
    metrics_ci: int = setting(0, metavar="N", help="bootstrap resamples for test-metric confidence intervals (0 = off)")
    fold_seed: int = 0  # seed of the patient-level fold assignment (same folds for every encoder)
    protocol: str = setting(
        "tuned", key="protocol", choices=PROTOCOLS,
        help="tuned: each trial picks its recipe from {recipes} on the validation split; fixed: one recipe ({lr}, "
             "{frozen_epochs}) for every encoder, as in the papers (default {default})")
    recipes: list[str] | None = setting(
        None, key="recipes", parse=recipe_texts, metavar="LR:FROZEN,...",
        help="the tuned grid as LR:FROZEN_EPOCHS, e.g. 1e-3:0,1e-3:10,1e-4:0,1e-4:10 (default: lr 1e-3 and 1e-4 x 0 "
             "and epochs/7 frozen)")
    bn_recalibrate: bool = setting(
        True, key="batchNormRecalibrate", flag="--no-bn-recalibrate", action="store_false",
        help="re-estimate batch-norm statistics on the training images before each evaluation: with tiny training "
             "sets the running averages never settle (default {default})",
        flag_help="keep batch-norm running averages instead of re-estimating them on the training images before "
                  "each evaluation")
    stopping: str = setting(
        "early", key="stopping", choices=STOPPINGS,
        help="early: each recipe stops when validation AUC stops improving ({patience}, {min_delta}), at most "
             "{epochs}; fixed: exactly {epochs}, as in the papers (default {default})")
    patience: int = setting(
        DEFAULT_PATIENCE, key="patience", metavar="N", schema={"minimum": 1, "maximum": 10000},
        help="with {stopping} early: epochs without a validation AUC gain (counted once the backbone is unfrozen) "
             "that end a recipe (default {default})")
    min_delta: float = setting(
        DEFAULT_MIN_DELTA, key="minDelta", metavar="AUC", schema={"minimum": 0, "exclusiveMaximum": 1},
        help="with {stopping} early: the smallest validation AUC gain that counts as one (default {default})")
    #: "early": a recipe still improving at ``epochs`` continues once for at most this many more epochs
    #: (None: ``epochs`` more, i.e. the maximum doubles once; 0: never, the cell is reported unconverged)
    extend_epochs: int | None = setting(
        None, key="extendEpochs", parse=int, metavar="N", schema={"minimum": 0, "maximum": 10000},
        help="with {stopping} early: a recipe still improving at {epochs} continues once by up to this many more "
             "epochs (default: {epochs} more, i.e. the maximum doubles once; 0: never, the cell is reported "
             "unconverged)")
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

    @classmethod
    def from_study(cls, section: dict[str, Any], **rest: Any) -> FinetuneConfig:
        """The config of a study file's ``finetune`` section (defaults filled in by its schema), through
        :data:`STUDY_KEYS`; ``rest`` holds what the study's other sections and its driver decide."""
        if "samplesPerClass" in section:
            rest["sizes"] = parse_sizes(samples_per_class=",".join(map(str, section["samplesPerClass"])))
        return from_section(cls, section, **rest)

    def as_params(self) -> dict[str, str]:
        return {k: json.dumps(v) if isinstance(v, list | dict) else str(v) for k, v in self.to_dict().items()}


#: study-file key (``finetune.<key>``) -> FinetuneConfig field, from the table; ``samplesPerClass`` ->
#: ``sizes`` (a parse) and ``random``, ``evaluation`` (what the study runs) are the study's own
STUDY_KEYS: dict[str, str] = study_keys(FinetuneConfig)
