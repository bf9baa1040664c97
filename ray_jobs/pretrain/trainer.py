"""The Ray Train trainer of a pre-training run: Ray Train's local mode in this process (one worker,
no actors, the shards streamed by :class:`~ray_jobs.pretrain.shard_stream.ShardStream`) or DDP workers
on a cluster (Ray Data streaming the shards, checkpoints in the run's storage, restarts on failure).
Both run the same :func:`~ray_jobs.pretrain.loop.train_loop_per_worker`.
"""

from __future__ import annotations

from typing import Any

from ctssl_base import ray_connect
from ray_jobs.pretrain.config import PretrainConfig
from ray_jobs.pretrain.data import DataInfo, build_dataset
from ray_jobs.pretrain.loop import train_loop_per_worker

#: Ray Train keeps this many of its own checkpoints (the run's budget-curve milestones are kept apart)
KEEP_CHECKPOINTS = 2


def build_trainer(cfg: PretrainConfig, info: DataInfo, payload: dict[str, Any], *, in_process: bool,
                  storage_fs: Any, storage_path: str) -> Any:  # noqa: ANN401 - a ray.train.torch.TorchTrainer
    """The trainer for ``payload`` (what every worker's loop gets); ``storage_fs``/``storage_path`` are
    Ray's filesystem and path for the run's storage (:func:`ray_jobs.ray_cluster.arrow_filesystem`)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    if in_process:
        from ray_jobs.pretrain.shard_stream import ShardStream

        return TorchTrainer(
            train_loop_per_worker, train_loop_config=payload,
            scaling_config=ray.train.ScalingConfig(num_workers=0),  # Ray Train's local mode: no actors
            run_config=ray.train.RunConfig(name=cfg.experiment),
            datasets={"train": ShardStream(info, seed=cfg.seed)},
        )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=payload,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.use_gpu, placement_strategy=cfg.placement_strategy,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.experiment, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
            worker_runtime_env={"env_vars": ray_connect.forwarded_env()},
        ),
        datasets={"train": build_dataset(info)},
    )
