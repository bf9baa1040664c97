"""Dataset reduction before pre-training ("Less is More", Wolf et al., arXiv 2410.14524).

Strategies (registry :data:`STRATEGIES`, one module each): ``every_n``, ``hash`` (volume or global
scope), ``ssim``, ``mutual_info``, ``embedding``. See ``docs/reduction.md``.
"""

from data_prep.reduce.base import STRATEGIES, Selection, SliceSet, Strategy, get_strategy
from data_prep.reduce.run import build_strategy, reduce_dataset
from data_prep.reduce.target import search_threshold

STRATEGIES.load()  # register every strategy on import, so the registry is complete

__all__ = ["STRATEGIES", "Selection", "SliceSet", "Strategy", "build_strategy", "get_strategy",
           "reduce_dataset", "search_threshold"]
