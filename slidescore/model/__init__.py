"""Patch classifiers: architectures, model cards, loading and scoring.

The only place that imports torch. :func:`load_model` turns a model reference from the config
into a :class:`PatchClassifier` (a torch module plus its :class:`ModelCard`), which scores a block
of pixels either densely (one pass, every patch at once, verified once against per-patch scoring)
or patch by patch in large batches.
"""

from typing import Any

from slidescore.model.card import ModelCard

__all__ = ["ModelCard", "PatchClassifier", "classifier_from_module", "load_model"]


def __getattr__(name: str) -> Any:  # lazy: importing the card must not import torch
    if name == "PatchClassifier":
        from slidescore.model import scoring

        return scoring.PatchClassifier
    if name in ("classifier_from_module", "load_model"):
        from slidescore.model import loading

        return getattr(loading, name)
    raise AttributeError(name)
