"""Counting the MLflow client calls a piece of code makes, so a test can assert they do not grow per run."""

from __future__ import annotations

import collections
import functools

METHODS = ("search_runs", "get_run", "get_experiment_by_name", "get_metric_history", "download_artifacts",
           "list_artifacts")


def count_tracking_calls(monkeypatch) -> collections.Counter:  # noqa: ANN001 - pytest's MonkeyPatch
    """Wrap the MlflowClient methods the report uses; the returned Counter fills as they are called
    (from any thread: a Counter update under the GIL is enough for a count)."""
    from mlflow.tracking import MlflowClient

    calls: collections.Counter = collections.Counter()
    for name in METHODS:
        orig = getattr(MlflowClient, name)

        def wrapped(self, *a, __orig=orig, __name=name, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
            calls[__name] += 1
            return __orig(self, *a, **kw)

        monkeypatch.setattr(MlflowClient, name, functools.wraps(orig)(wrapped))
    return calls
