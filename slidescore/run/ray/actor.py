"""The scoring actor: one process holding the model, scoring blocks of planned images.

Each task scores some blocks of one image with the job's :class:`~slidescore.stages.recipe.BlockRecipe`
through the block stage (:func:`~slidescore.stages.block.score_blocks`, the loop the local runner
runs too) and returns their small records; the blocks write their own chunks and markers.

The model comes through the object store: the driver resolves ``model.name`` once, reads the
network file's bytes (:meth:`~slidescore.model.loading.ModelFiles.with_data`, checked against its
sha256) and puts them there once; every actor builds its classifier from those bytes
(:func:`~slidescore.model.loading.load_files`), so no worker reads the model from disk or S3 and
every actor runs exactly the driver's model, whatever its node can see.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import ray

from slidescore.config import JobConfig
from slidescore.core.types import Box
from slidescore.errors import SlideScoreError, TransientStorageError
from slidescore.io import SlideReader
from slidescore.io.base import expect_reads
from slidescore.io.storage import is_local
from slidescore.run.ray.pool import WarmPool
from slidescore.run.ray.state import cpu_s, process_age_s
from slidescore.stages.block import score_blocks
from slidescore.stages.plan import SamplePlan, open_for_plan
from slidescore.stages.recipe import BlockRecipe
from slidescore.stages.records import BlockRecord

if TYPE_CHECKING:
    from slidescore.model.loading import ModelFiles


@dataclass(frozen=True)
class TaskResult:
    """What one actor task returns: its block records and what it cost."""

    records: list[BlockRecord]
    seconds: float  # wall time of the task in the actor (reader open, read, score, blend, write)
    bytes_read: int  # decoded pixel bytes the task read from the image (blocks with foreground only)
    scoring: dict[str, Any] | None = None  # the classifier's scoring_info() after the task (dense check, options)


class LeaseLostError(SlideScoreError):
    """A warm pool actor was asked to score for a job whose lease expired (the driver replaces it)."""


def model_id(files_or_model: Any) -> tuple[str, str]:
    """What identifies a built classifier: its network checksum and its card."""
    return (str(files_or_model.checksum), json.dumps(files_or_model.card.to_dict(), sort_keys=True, default=str))


class _CountingReader:
    """A :class:`~slidescore.io.SlideReader` that counts the decoded bytes it hands out."""

    def __init__(self, inner: SlideReader) -> None:
        self.inner = inner
        self.uri, self.levels, self.mpp, self.mpp_source = inner.uri, inner.levels, inner.mpp, inner.mpp_source
        self.n_channels, self.dtype = inner.n_channels, inner.dtype
        self.bytes_read = 0
        self._lock = threading.Lock()  # read-ahead threads read concurrently

    def read(self, level: int, box: Box) -> np.ndarray:
        data = self.inner.read(level, box)
        with self._lock:
            self.bytes_read += int(data.nbytes)
        return data

    def expect(self, level: int, boxes: list[Box]) -> None:
        expect_reads(self.inner, level, boxes)

    def close(self) -> None:
        self.inner.close()


# -- the actor --------------------------------------------------------------------------------
@ray.remote
class ScoringActor:
    """One scoring process: the model loaded once (:meth:`load`), readers kept open per image URI."""

    MAX_OPEN_READERS = 4

    def __init__(self, cfg: JobConfig, device: str, crash_on_task: int | None = None, transient_errors: int = 0,
                 keep_warm_s: float = 0.0) -> None:
        # no model yet: the process starts (and imports this module) while the driver reads the model
        self.cfg, self.device = cfg, device
        self.model: Any = None
        self.model_key: tuple[Any, ...] | None = None
        self.recipe: BlockRecipe | None = None
        self.readers: collections.OrderedDict[str, _CountingReader] = collections.OrderedDict()
        self.tasks = 0
        self.jobs = 0  # jobs this process has loaded for (> 1: a warm pool actor taken over)
        self._crash_on = crash_on_task
        self._transient = transient_errors
        self.pool: WarmPool | None = WarmPool(keep_warm_s) if keep_warm_s > 0 else None

    # -- the warm pool (cluster.keep_warm_s; slidescore.run.ray.pool) -----------------------------
    def acquire(self, token: str, deadline: float | None, fingerprint: str) -> str:
        """Take this pool actor for one job; '' when taken, else why not."""
        return "not a pool actor" if self.pool is None else self.pool.acquire(token, deadline, fingerprint)

    def touch(self, token: str) -> bool:
        """Keep the lease fresh while the job plans without sending tasks; whether ``token`` still holds it."""
        if self.pool is None:
            return True
        self.pool.enter()
        self.pool.leave()
        return self.pool.holds(token)

    def release(self, token: str) -> bool:
        """The job is done with this actor: drop its readers and leave it warm for the next job."""
        if self.pool is None or not self.pool.holds(token):
            return False
        self._close_readers()
        return self.pool.release(token)

    def retire(self) -> bool:
        """Exit now unless a job holds it (a pool of another code version making room)."""
        return self.pool is not None and self.pool.retire()

    # -- work -------------------------------------------------------------------------------
    def load(self, files: ModelFiles | list[Any], cfg: JobConfig | None = None, token: str | None = None) -> dict[str, Any]:
        """Build the classifier from the model's bytes; returns :meth:`info`.

        ``files``: the :class:`ModelFiles` (an object-store reference Ray resolved before this ran),
        or a list holding that reference unresolved (a warm actor fetches it only when the model it
        holds is another). ``cfg`` replaces the config of the job that started the process.
        """
        from slidescore.model.loading import load_files

        if self.pool is not None and not self.pool.holds(token):
            return {"refused": self.pool.why_not(token)}
        self.jobs += 1
        self._close_readers()  # a reader of the last job may show a file that has changed since
        self.cfg = cfg or self.cfg
        options = {k: v for k, v in self.cfg.model.runtime_options().items() if k not in ("card", "device")}
        how = (self.cfg.model.mode, tuple(sorted(options.items())))
        new: ModelFiles | None = None
        if not isinstance(files, list):
            new = files
        elif self.model is None or self.model_key != (files[1], how):  # [reference, model_id]: else keep the classifier
            new = ray.get(files[0])
        if new is not None:
            self.model = load_files(new, **options, device=self.device)
            self.model_key = (model_id(new), how)
        self.recipe = BlockRecipe.for_job(self.model, self.cfg)
        return self.info()

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "device": str(self.model.device), "checksum": self.model.checksum, "card": self.model.card.to_dict(),
                "scoring": self.model.scoring_info() if hasattr(self.model, "scoring_info") else None,
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "jobs": self.jobs,
                "cpu_s": cpu_s(), "process_s": process_age_s(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def score(self, plan: SamplePlan, block_indices: list[int], token: str | None = None) -> TaskResult:
        """Score some blocks of one sample (each writes its own chunks and completion marker)."""
        if self.pool is None:
            return self._score(plan, block_indices)
        if not self.pool.holds(token):  # the lease expired and another job took this actor: never score for two
            raise LeaseLostError(f"pool actor {os.getpid()} is no longer leased to this job")
        self.pool.enter()
        try:
            return self._score(plan, block_indices)
        finally:
            self.pool.leave()

    def _score(self, plan: SamplePlan, block_indices: list[int]) -> TaskResult:
        t0 = time.perf_counter()
        self.tasks += 1
        if self.tasks == self._crash_on:
            os._exit(1)  # test hook: die like a killed process, mid-run
        if self.tasks <= self._transient:
            raise TransientStorageError(f"injected transient storage error (task {self.tasks})", uri=plan.uri)
        assert self.recipe is not None, "load() runs before any task"
        reader = self._reader(plan)
        bytes_before = reader.bytes_read
        try:
            depth = self.cfg.model.prefetch_depth(self.model.device.type, not is_local(plan.uri))
            records = list(score_blocks(plan, [plan.blocks[i] for i in block_indices], reader, self.recipe, depth))
            scoring = self.model.scoring_info() if hasattr(self.model, "scoring_info") else None
            return TaskResult(records, time.perf_counter() - t0, reader.bytes_read - bytes_before, scoring)
        except TransientStorageError:
            self._drop_reader(plan.uri)  # the retry reopens it: the handle may be what went wrong
            raise

    def _reader(self, plan: SamplePlan) -> _CountingReader:
        uri = plan.uri
        if uri in self.readers:
            self.readers.move_to_end(uri)
            return self.readers[uri]
        reader = _CountingReader(open_for_plan(plan))  # converted/resampled as planned (io.adapt)
        self.readers[uri] = reader
        while len(self.readers) > self.MAX_OPEN_READERS:
            self._drop_reader(next(iter(self.readers)))
        return reader

    def _drop_reader(self, uri: str) -> None:
        reader = self.readers.pop(uri, None)
        if reader is not None:
            reader.close()

    def _close_readers(self) -> None:
        while self.readers:
            self._drop_reader(next(iter(self.readers)))


@ray.remote
class EmbeddingActor:
    """One embedding process: the encoder (shipped once through the object store by the driver, as an
    object reference Ray resolves before this runs) moved to this actor's device; embeds blocks with
    :func:`~slidescore.stages.embed.embed_blocks`, the loop ``slidescore embed`` runs in one process."""

    def __init__(self, encoder: Any, cfg: JobConfig, device: str) -> None:
        from slidescore.model.vit import PatchEncoder

        if device != "cpu" and encoder.device.type == "cpu":
            encoder = PatchEncoder(encoder.module, encoder.card, device=device, checksum=encoder.checksum,
                                   source=encoder.source, amp=cfg.model.amp,
                                   arch=encoder.arch)
        self.encoder, self.cfg = encoder, cfg

    def checksum(self) -> str:
        return str(self.encoder.checksum)

    def embed(self, ep: Any, block_indices: list[int]) -> list[dict[str, Any]]:
        from slidescore.stages.embed import embed_blocks

        depth = self.cfg.model.prefetch_depth(self.encoder.device.type, not is_local(ep.plan.uri))
        return embed_blocks(ep, self.encoder, batch_size=self.cfg.model.batch_size, depth=depth,
                            blocks=[ep.plan.blocks[i] for i in block_indices])
