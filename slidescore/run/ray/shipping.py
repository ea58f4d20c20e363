"""The job's model on the driver: read once, shipped once, built on the driver only when needed.

The driver needs the model's *card* and *checksum* (they key the runs and drive planning) and the
actors need its bytes; neither needs torch on the driver. :func:`ship_model` resolves ``model.name``
once (:func:`~slidescore.model.loading.resolve_model`), reads the network file's bytes once (checked
against their sha256) and puts them into the object store once. The card planned with is the
file's card, unless building the network may change it (an ONNX network or an exported program
with ``dense: true`` is scored per patch): then the driver builds its CPU copy at once, as before,
and takes the built card. Every actor reports the card and checksum it built; the driver refuses
one that differs (``ModelLoadError``), so the card planned with is always the card scored with.
The driver's CPU copy itself is built on first use only (:meth:`ShippedModel.local`): for the
explanation maps of the report (``report.gradcam``), in the finishing thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import ray

from slidescore.config import JobConfig
from slidescore.model.card import ModelCard


@dataclass
class ShippedModel:
    """The model of one job: its files (bytes read), their object-store reference, the card planned with."""

    files: Any  # slidescore.model.loading.ModelFiles with its data
    ref: Any  # ray.ObjectRef of ``files``
    card: ModelCard
    _local: Any = None  # the driver's CPU copy, once built
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def checksum(self) -> str:
        return str(self.files.checksum)

    @property
    def source(self) -> str:
        return str(self.files.source)

    @property
    def n_bytes(self) -> int:
        return len(self.files.data or b"")

    def local(self) -> Any:
        """The driver's CPU copy (imports torch and builds the network on the first call)."""
        with self._lock:
            if self._local is None:
                from slidescore.model.loading import load_files

                self._local = load_files(self.files, device="cpu")  # the GPUs are left to the actors
            return self._local

    def for_report(self, cfg: JobConfig) -> Any:
        """The classifier the report's explanation maps need, or None when the report draws none."""
        r = cfg.report
        return self.local() if r.enabled and r.gradcam and r.top_k > 0 else None

    def info(self, devices: set[str], scoring: dict[str, Any] | None) -> dict[str, Any]:
        """The ``model`` entry of run.json: what ``records.model_info`` gives for a loaded classifier,
        with the actors' devices and their classifier's scoring record."""
        info: dict[str, Any] = {"source": self.source, "sha256": self.checksum, "card": self.card.to_dict(),
                                "device": ",".join(sorted(devices)) or "cpu"}
        if scoring is not None:
            info["scoring"] = scoring
        return info


def ship_model(cfg: JobConfig) -> ShippedModel:
    """Resolve, read and ship the job's model (see the module docstring)."""
    from slidescore.model.files import resolve_model

    files = resolve_model(cfg.model.name, card=cfg.model.card).with_data()
    shipped = ShippedModel(files, ray.put(files), files.card)
    if files.kind in ("onnx", "export") and files.card.dense:  # building it may turn dense off: take the built card
        shipped.card = shipped.local().card
    return shipped
