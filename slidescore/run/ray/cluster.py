"""Ray-side set-up of a run: connecting to the cluster and the device the actors load the model on."""

from __future__ import annotations

import ray

from slidescore.config import ClusterConfig, JobConfig
from slidescore.errors import ConfigError, SlideScoreError


class ClusterError(SlideScoreError):
    """The cluster cannot run the job (no actor could start, or Ray cannot be reached)."""


def actor_device(cfg: JobConfig) -> str:
    """The torch device actors load the model on: the GPU Ray assigned them, or the CPU."""
    gpus = cfg.cluster.num_gpus_per_actor
    if gpus == 0:
        if cfg.model.device.startswith("cuda"):
            raise ConfigError(
                f"model.device: {cfg.model.device!r} needs GPUs, but cluster.num_gpus_per_actor is 0; "
                "reserve GPUs for the actors (e.g. 1 or 0.5) or use model.device auto/cpu"
            )
        return "cpu"
    if cfg.model.device == "cpu":
        raise ConfigError(
            f"cluster.num_gpus_per_actor: {gpus} GPUs reserved per actor but model.device is 'cpu'; "
            "set num_gpus_per_actor to 0 or model.device to auto"
        )
    if cfg.model.device == "auto":
        # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU(s), so cuda:0 there is its own GPU; "auto" also
        # lets a cluster of logical GPUs without CUDA (tests, CPU nodes advertising GPUs) run on the CPU.
        return "auto"
    return "cuda"


def connect(cluster: ClusterConfig) -> bool:
    """``ray.init`` unless already connected; returns whether this call connected."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=cluster.address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ClusterError(
            f"cluster.address: cannot connect to Ray at {cluster.address or 'auto/local'} ({type(e).__name__}: {e}); "
            "check the address, that the head is running, and RAY_AUTH_MODE / the auth token"
        ) from None
    return True
