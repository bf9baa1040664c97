"""MLflow helpers shared by pre-training, the fine-tuning study and the report.

Everything goes through an explicit :class:`mlflow.MlflowClient` with an explicit tracking URI rather
than mlflow's global "active run": Ray workers, Tune trials and the driver are different processes,
and each must log into the same run (identified by its id) without relying on process-global state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from importlib.metadata import entry_points
from typing import Any
from urllib.parse import unquote, urlparse, urlsplit, urlunsplit

from ctssl_base import storage as st
from ctssl_base.errors import UserError
from ctssl_base.uri_secrets import redact_text, redact_uri  # noqa: F401 - redact_uri: used by callers
from data_prep import shards

log = logging.getLogger(__name__)

#: tag keys (the MLflow UI groups and filters by them)
TAG_KIND = "ctssl.kind"  # "pretrain" | "study" | "trial"
TAG_RUN_KEY = "ctssl.run_key"  # identifies a pre-training run across restarts
TAG_STUDY = "ctssl.study"
PARENT_TAG = "mlflow.parentRunId"
DEFAULT_DB = "mlflow.db"


#: URI schemes MLflow's client opens (its registry; psycopg2/pymysql/pyodbc drivers for the databases)
DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
SERVER_SCHEMES = ("http", "https", "databricks")
WORKING_SCHEMES = "sqlite:///PATH/mlflow.db, http(s)://HOST:PORT (an MLflow server), postgresql://, mysql://, " \
                  "mssql://, databricks"


def check_tracking_uri(uri: str, origin: str = "--tracking-uri") -> str:
    """``uri`` when MLflow can open it, else a one-line :class:`UserError` naming the schemes that work.

    Without this a bad URI surfaces as a long MLflow traceback only when the first run is created,
    after Ray has started and the data was read. Checked on the text alone (no mlflow import: that
    costs seconds), so every command can call it first. MLflow 3 refuses its file store
    (``file://`` or a bare folder) unless ``MLFLOW_ALLOW_FILE_STORE`` is set; schemes added by MLflow
    plugins (``mlflow.tracking_store`` entry points) are accepted as MLflow would.
    """
    text = uri.strip()
    if text.lower() == "databricks":  # MLflow's name for the default Databricks profile
        return uri
    parsed = urlparse(text)
    scheme = parsed.scheme.lower()  # how MLflow picks its store, too
    base = scheme.split("+", 1)[0]  # postgresql+psycopg2, mysql+pymysql ...
    if base in ("http", "https") and not parsed.netloc:
        raise UserError(f"{origin} {redact_uri(uri)}: no host in the URI; e.g. http://mlflow:5000")
    if base in DB_SCHEMES or base in SERVER_SCHEMES or scheme in _plugin_schemes():
        return uri
    if scheme in ("", "file"):
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() in ("1", "true", "yes"):
            return uri
        raise UserError(f"{origin} {redact_uri(uri)}: MLflow no longer opens a file store (file:// or a folder) unless "
                        f"MLFLOW_ALLOW_FILE_STORE=true; use one of {WORKING_SCHEMES}")
    raise UserError(f"{origin} {redact_uri(uri)}: unknown tracking URI scheme {scheme!r}; use one of {WORKING_SCHEMES}")


def _plugin_schemes() -> set[str]:
    try:
        return {ep.name.lower() for ep in entry_points(group="mlflow.tracking_store")}
    except Exception:  # noqa: BLE001 - a broken package's metadata must not stop a run
        return set()


def resolve_tracking_uri(explicit: str | None, storage: str | None) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite file in a local storage folder.

    A remote (S3) storage with no tracking server is an error rather than a silent local database that
    nobody would find again. A given URI is checked here (:func:`check_tracking_uri`), before any
    command starts Ray or reads data, so a typo costs one line, not a traceback minutes later.
    """
    if explicit:
        uri = check_tracking_uri(explicit)
        if redact_uri(uri) != uri:
            # the processes this one starts (a local Ray's workers) find the password here, never in a
            # payload, a runtime env or a pickle (see worker_uri)
            os.environ["MLFLOW_TRACKING_URI"] = uri
        return uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return check_tracking_uri(env, origin="MLFLOW_TRACKING_URI")

    if storage and st.is_local(storage):
        _, path = st.open_fs(storage)
        os.makedirs(path, exist_ok=True)
        return f"sqlite:///{os.path.join(path, DEFAULT_DB)}"
    raise UserError(f"--storage {storage} is not a local folder: give --tracking-uri (or set "
                    "MLFLOW_TRACKING_URI) so the runs are recorded where they can be found again")


def default_artifact_location(tracking_uri: str, storage: str | None) -> str | None:
    """Artifacts of a SQLite-tracked experiment live beside the database, not in the current folder."""
    if tracking_uri.startswith("sqlite:") and storage:
        from ctssl_base import storage as st

        if st.is_local(storage):
            _, path = st.open_fs(storage)
            return "file://" + os.path.join(path, "mlflow-artifacts")
    return None


def worker_uri(tracking_uri: str) -> str:
    """The form of ``tracking_uri`` handed to Ray workers and Tune trials (payloads, pickles): without
    its password. :func:`client` puts the password back from the worker's own environment."""
    return redact_uri(tracking_uri, keep_password_mark=False)


def _with_password(tracking_uri: str) -> str:
    """``tracking_uri`` stripped of its password (:func:`worker_uri`) is completed from
    ``$MLFLOW_TRACKING_URI`` when that is the same URI with one; else unchanged (an HTTP server then
    takes ``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` from the environment)."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "")
    if env and env != tracking_uri and worker_uri(env) == tracking_uri:
        return env
    return tracking_uri


def _http_login_to_env(tracking_uri: str) -> str:
    """An HTTP(S) server URI's ``user:password@`` moved into ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``
    (MLflow's basic-auth settings; values already set win), and the URI returned without it: MLflow
    prints the client's URI in its "View run at" lines, which must not show the password."""
    parts = urlsplit(tracking_uri)
    if parts.scheme.lower() not in ("http", "https") or parts.password is None:
        return tracking_uri
    os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(parts.username or ""))
    os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(parts.password))
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def client(tracking_uri: str):
    """An MLflow client for ``tracking_uri``; the URI is checked first (see :func:`check_tracking_uri`)
    so a command that takes a URI without :func:`resolve_tracking_uri` still fails in one line. A URI
    without its password (what workers are handed, :func:`worker_uri`) gets it back from this process's
    environment; an HTTP server's login goes to MLflow's basic-auth variables instead of the URI."""
    tracking_uri = _with_password(tracking_uri)
    check_tracking_uri(tracking_uri, origin="tracking URI")
    import mlflow

    return mlflow.MlflowClient(tracking_uri=_http_login_to_env(tracking_uri))


def get_or_create_experiment(cl, name: str, artifact_location: str | None = None) -> str:
    exp = cl.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            cl.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return cl.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # noqa: BLE001 - another process created it between our two calls
        exp = cl.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_run(cl, experiment_id: str, tags: dict[str, str]) -> Any | None:
    """The most recent run of the experiment carrying all ``tags`` (None when there is none)."""
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = cl.search_runs([experiment_id], filter_string=flt, order_by=["attributes.start_time DESC"],
                          max_results=1)
    return runs[0] if runs else None


def log_params(cl, run_id: str, params: dict[str, Any]) -> None:
    """Params in batches (MLflow caps a batch at 100); values cut to MLflow's 6000-char limit, with the
    password of any URI in them masked (a tracking or database URI in a config)."""
    from mlflow.entities import Param

    items = [Param(k, redact_text(str(v))[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        cl.log_batch(run_id, params=items[i:i + 100])


class MetricLogger:
    """Buffers metrics and writes them with ``log_batch``: one request per flush, not per value."""

    def __init__(self, cl, run_id: str, flush_every: int = 10):
        self.cl, self.run_id, self.flush_every = cl, run_id, max(1, flush_every)
        self._buf: list = []
        self._n = 0

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            self._buf.append(Metric(k, float(v), ts, int(step)))
        self._n += 1
        if self._n >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        buf, self._buf, self._n = self._buf, [], 0
        for i in range(0, len(buf), 1000):
            try:
                self.cl.log_batch(self.run_id, metrics=buf[i:i + 1000])
            except Exception as e:  # noqa: BLE001 - losing a metric must not kill a training run
                log.warning("MLflow metric logging failed (%s); continuing", e)


def set_tags(cl, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    cl.log_batch(run_id, tags=[RunTag(k, redact_text(str(v))) for k, v in tags.items()])


def metric_history(cl, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in cl.get_metric_history(run_id, key))


def log_artifacts(cl, run_id: str, paths: Iterable[str], artifact_path: str | None = None) -> None:
    for p in paths:
        cl.log_artifact(run_id, p, artifact_path=artifact_path)


# ------------------------------------------------------------------ studies: stages, datasets, registry
#: which stage of a study made a run ("pretrain" | "finetune"): a study keeps all its runs in one
#: experiment, and the UI filters them by this tag
TAG_STAGE = "ctssl.stage"
#: tag keys a caller's extra tags may not set: they identify a run for resuming and for the report
RESERVED_TAGS = (TAG_KIND, TAG_RUN_KEY, PARENT_TAG)
#: the artifact folder of a pre-training run that holds encoder.pt + encoder_config.json
ENCODER_ARTIFACT = "encoder"
#: MLflow's tag on a dataset input naming what the run used the data for
DATASET_CONTEXT_TAG = "mlflow.data.context"
DIGEST_CHARS = 16  # MLflow keeps at most 36 characters of a dataset digest


def check_tags(tags: Any, origin: str = "tags") -> dict[str, str]:
    """``tags`` as a ``{str: str}`` dict, or a one-line :class:`UserError`: a mapping of non-empty names
    to scalars (a YAML number becomes its text), none of them a key ctssl sets itself."""
    if tags is None:
        return {}
    if not isinstance(tags, dict):
        raise UserError(f"{origin} must be a mapping of tag names to values, got {type(tags).__name__}")
    out: dict[str, str] = {}
    for k, v in tags.items():
        if not isinstance(k, str) or not k.strip():
            raise UserError(f"{origin}: tag names must be non-empty text, got {k!r}")
        if k in RESERVED_TAGS:
            raise UserError(f"{origin}: {k!r} is set by ctssl itself (it identifies the run); choose another name")
        if isinstance(v, dict | list | tuple | set) or v is None:
            raise UserError(f"{origin}: tag {k!r} needs a text or number value, got {v!r}")
        out[k] = str(v)
    return out


def _source_type(url: str) -> str:
    """MLflow's name for where a dataset lives: the URL scheme (``s3``, ``gs``...), ``local`` for a path."""

    return "local" if st.is_local(url) else url.split("://", 1)[0].lower()


def dataset_input(name: str, data_url: str, selection: str | None = None, *,
                  context: str = "train"):  # noqa: ANN201 - mlflow.entities.DatasetInput
    """The MLflow dataset input describing committed shards (optionally narrowed by a selection).

    Everything comes from the manifests, never from the rows: the digest is the prep output's
    committed content (:func:`data_prep.shards.manifest_digest`: shard paths, row counts, checksums),
    combined with the selection's checksum when there is one, so the same data always has the same
    digest and any change to it a new one. The source is the data URL and the selection URL; the
    profile holds counts and the selection's settings. No patient data.
    """

    from mlflow.entities import Dataset, DatasetInput, InputTag

    base = shards.read_manifest(data_url)
    digest = shards.manifest_digest(data_url)
    rows = sum(int(s["rows"]) for s in base.get("shards", []))
    profile: dict[str, Any] = {"base_rows": rows, "shards": len(base.get("shards", [])),
                               "intensity": base.get("intensity", "hu"),
                               "schema_version": base.get("schema_version")}
    if selection:
        sel = shards.read_manifest(selection)
        digest = hashlib.sha256(f"{sel.get('base_manifest_sha256')}:{sel.get('selection_sha256')}".encode()).hexdigest()
        rows = int((sel.get("counts") or {}).get("kept_rows", 0))
        profile["selection"] = {k: v for k, v in (sel.get("config") or {}).items()
                                if isinstance(v, str | int | float | bool)}
    profile["rows"] = rows
    ds = Dataset(name=name, digest=digest[:DIGEST_CHARS], source_type=_source_type(data_url),
                 source=json.dumps({"uri": data_url, "selection": selection}, sort_keys=True),
                 profile=json.dumps(profile, sort_keys=True))
    return DatasetInput(ds, tags=[InputTag(DATASET_CONTEXT_TAG, context)])


def log_dataset_input(cl, run_id: str, name: str, data_url: str, selection: str | None = None, *,
                      context: str = "train"):  # noqa: ANN201 - mlflow.entities.Dataset
    """Log the shards a run read as its dataset input (see :func:`dataset_input`); MLflow keeps one
    input per dataset and run, so logging it again on a resumed run adds nothing."""
    inp = dataset_input(name, data_url, selection, context=context)
    cl.log_inputs(run_id, datasets=[inp])
    return inp.dataset


def register_artifact(cl, name: str, run_id: str, artifact_path: str = ENCODER_ARTIFACT,
                      tags: dict[str, Any] | None = None, description: str | None = None):  # noqa: ANN201
    """A version of registered model ``name`` whose source is the run's ``artifact_path`` folder.

    The registered model is created when missing (also when another driver creates it at the same
    moment). A run gets one version: when the model already has a version of ``run_id`` (a restarted
    driver registering again), that version is returned and none is added. Returns the
    :class:`mlflow.entities.model_registry.ModelVersion`.
    """
    from mlflow.exceptions import MlflowException

    existing = _versions_of_run(cl, name, run_id)
    if existing:
        return existing[0]
    try:
        cl.create_registered_model(name, description=description)
        log.info("MLflow registered model %s created", name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{cl.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    version = cl.create_model_version(name, source, run_id=run_id,
                                      tags={k: str(v) for k, v in (tags or {}).items()} or None,
                                      description=description)
    log.info("registered %s of run %s as %s version %s", artifact_path, run_id, name, version.version)
    return version


#: the file of MLflow's model format; present in a run's encoder folder once the PyTorch flavour is there
MLMODEL_FILE = "MLmodel"


def register_pytorch_flavour(cl, run_id: str, artifact_path: str = ENCODER_ARTIFACT) -> bool:
    """Make the run's encoder folder an MLflow model of the PyTorch flavour as well, so that
    ``mlflow.pytorch.load_model("models:/NAME@ALIAS")`` (or ``runs:/RUN_ID/encoder``) gives the
    encoder as a torch module. True when the folder is (or already was) one, False when the encoder
    could not be exported (a warning says why; the folder keeps its files and still registers).

    The module is saved as a ``torch.export`` program (MLflow's "pt2" format): it loads with torch
    alone, needs no pickle (so no code runs when it is read), and keeps the batch size dynamic; its
    input is fixed at the channels and size the encoder was pre-trained with, as the signature says.
    ``encoder.pt`` and ``encoder_config.json`` stay where they were, for ``ctssl finetune --encoder``
    and ``ctssl export``; the flavour adds ``MLmodel``, ``data/model.pt2`` and MLflow's environment
    files beside them. A run whose folder already holds ``MLmodel`` is left as it is.
    """

    from ray_jobs.pretrain.checkpoint import ENCODER_CONFIG_FILE, ENCODER_FILE

    if any(os.path.basename(f.path) == MLMODEL_FILE for f in cl.list_artifacts(run_id, artifact_path)):
        return True
    bar_var = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # two small downloads: no progress bar lines in the log
    bar = os.environ.get(bar_var)
    os.environ[bar_var] = "false"
    try:
        import mlflow.pytorch
        import numpy as np
        import torch
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        from ssl_core.export import encoder_module, example_input

        with tempfile.TemporaryDirectory(prefix="ctssl-flavour-") as tmp:
            state = torch.load(cl.download_artifacts(run_id, f"{artifact_path}/{ENCODER_FILE}", tmp),
                               map_location="cpu", weights_only=True)
            with open(cl.download_artifacts(run_id, f"{artifact_path}/{ENCODER_CONFIG_FILE}", tmp)) as f:
                config = json.load(f)
            chans, size = int(config.get("in_chans", 1)), int(config["img_size"])
            module = encoder_module(str(config["backbone"]), state, chans)
            example = example_input(chans, size)
            with torch.no_grad():
                width = int(module(example).shape[1])
            signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype("float32"), (-1, chans, size, size))]),
                                       outputs=Schema([TensorSpec(np.dtype("float32"), (-1, width))]))
            folder = os.path.join(tmp, "model")
            mlflow.pytorch.save_model(module, folder, serialization_format="pt2", signature=signature,
                                      input_example=example.numpy(),
                                      pip_requirements=[f"torch=={torch.__version__.split('+', 1)[0]}"])
            cl.log_artifacts(run_id, folder, artifact_path)
    except Exception as e:  # noqa: BLE001 - an architecture torch.export cannot take must not lose the run
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        log.warning("the encoder of run %s could not be saved in MLflow's PyTorch format (%s: %s); it is "
                    "registered without it (ctssl export writes plain files)", run_id, type(e).__name__, first[:200])
        return False
    finally:
        if bar is None:
            os.environ.pop(bar_var, None)
        else:
            os.environ[bar_var] = bar
    log.info("run %s: %s/ is also an MLflow PyTorch model (mlflow.pytorch.load_model)", run_id, artifact_path)
    return True


def register_alias(cl, name: str, run_id: str, alias: str, clear: Iterable[str] = ()):  # noqa: ANN201
    """Point alias ``alias`` of registered model ``name`` at the version made from ``run_id`` (moving it
    off any other version), and remove the same alias from the registered models in ``clear`` that
    hold it, so that of a study's encoders only the one it now names carries it. Returns the
    :class:`ModelVersion`; a one-line :class:`UserError` when ``run_id`` has no version of ``name``.
    Aliases, not the deprecated stages, are how MLflow names a version for users to load."""
    from mlflow.exceptions import MlflowException

    versions = _versions_of_run(cl, name, run_id)
    if not versions:
        raise UserError(f"registered model {name!r} has no version of run {run_id}: cannot set alias {alias!r}")
    version = versions[-1]
    cl.set_registered_model_alias(name, alias, version.version)
    for other in clear:
        if other == name:
            continue
        try:
            if alias in (cl.get_registered_model(other).aliases or {}):
                cl.delete_registered_model_alias(other, alias)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
    log.info("alias %s of %s -> version %s (run %s)", alias, name, version.version, run_id)
    return version


def _versions_of_run(cl, name: str, run_id: str) -> list:
    """Versions of registered model ``name`` made from ``run_id``, oldest first ([] when there are none
    or the model does not exist yet). Searched by run id alone (a hex id needs no quoting in a filter),
    then narrowed to ``name`` here."""
    found = cl.search_model_versions(f"run_id = '{run_id}'")
    return sorted((v for v in found if v.name == name), key=lambda v: int(v.version))
