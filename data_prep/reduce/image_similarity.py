"""SSIM and mutual-information strategies ("Less is More" compared both with hashing)."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from ctssl_base.errors import UserError
from data_prep.reduce.base import STRATEGIES, SliceSet
from data_prep.reduce.sequential import LastKeptSimilarity, gather_features
from data_prep.reduce.similarity import nmi_pairs, ssim_pairs, thumbnails


def add_size_argument(parser: argparse._ArgumentGroup) -> None:
    if not any(a.dest == "size" for a in parser._group_actions):
        parser.add_argument("--size", type=int, default=128,
                            help="ssim/mutual_info/embedding: compare slices reduced to about this many "
                                 "pixels per side (default 128)")


class _ThumbnailStrategy(LastKeptSimilarity):
    def __init__(self, size: int = 128, **options: Any) -> None:
        super().__init__(size=size, **options)
        if size < 8:
            raise UserError(f"--size {size}: must be >= 8")
        self.size = size

    @classmethod
    def add_arguments(cls, parser: argparse._ArgumentGroup) -> None:
        super().add_arguments(parser)
        add_size_argument(parser)

    @classmethod
    def options_from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
        return {**super().options_from_args(args), "size": args.size}

    def compute_features(self, data: SliceSet, progress: bool) -> np.ndarray:
        return gather_features(data, lambda hu: thumbnails(hu, self.size), progress, self.name)


@STRATEGIES.register("ssim")
class SSIMStrategy(_ThumbnailStrategy):
    help = "drop a slice whose SSIM to the last kept slice of its series is above the threshold"
    threshold_name = "SSIM"
    default_threshold = 0.9
    lower = -1.0
    upper = 1.0

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return ssim_pairs(a, b)


@STRATEGIES.register("mutual_info")
class MutualInfoStrategy(_ThumbnailStrategy):
    help = "drop a slice whose normalised mutual information with the last kept slice is above the threshold"
    threshold_name = "normalised mutual information"
    default_threshold = 0.6
    lower = 0.0
    upper = 1.0

    def __init__(self, bins: int = 32, **options: Any) -> None:
        super().__init__(bins=bins, **options)
        if not 2 <= bins <= 256:
            raise UserError(f"--bins {bins}: must be in [2, 256]")
        self.bins = bins

    @classmethod
    def add_arguments(cls, parser: argparse._ArgumentGroup) -> None:
        super().add_arguments(parser)
        parser.add_argument("--bins", type=int, default=32,
                            help="mutual_info: grey-level bins of the joint histogram (default 32)")

    @classmethod
    def options_from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
        return {**super().options_from_args(args), "bins": args.bins}

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return nmi_pairs(a, b, self.bins)
