"""The exception tree of slidescore.

Every error the package raises on purpose derives from :class:`SlideScoreError`. Per-sample
problems are :class:`InputError` subclasses: the run records them in ``failures.jsonl`` and goes
on with the other samples. :class:`ConfigError` is a usage error (exit code 2). Only
:class:`TransientStorageError` is retried. All classes survive a pickle round trip, because Ray
ships exceptions between processes.
"""

from __future__ import annotations

from typing import Any


class SlideScoreError(Exception):
    """Base class. ``message`` is the human sentence; ``context`` holds machine-readable details."""

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context = context

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.context))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[SlideScoreError], message: str, context: dict[str, Any]) -> SlideScoreError:
    return cls(message, **context)


class ConfigError(SlideScoreError, ValueError):
    """The configuration or command line is wrong; nothing was started (exit code 2)."""


class InputError(SlideScoreError):
    """One sample cannot be scored; the other samples go on (exit code 1)."""


class SampleNotFoundError(InputError, FileNotFoundError):
    """The image URI does not exist."""


class UnsupportedImageError(InputError):
    """The file is not an image slidescore can read (format, dtype, size, channels)."""


class ResolutionError(InputError):
    """The image has no usable µm/px and none was given in the config."""


class ModelLoadError(InputError):
    """The model file or package cannot be loaded."""


class ModelOutputError(InputError):
    """The model failed while scoring a sample: its forward raised, or it returned outputs of the
    wrong shape, NaN/inf, or probabilities outside [0, 1]."""


class RoiError(InputError):
    """A sample's region of interest (``mask.roi`` / the sample's ``roi``) cannot be used: unreadable,
    hostile (too large, non-finite coordinates), outside the image, in other units, or empty after filtering."""


class TransientStorageError(SlideScoreError):
    """A storage call failed in a way that may succeed on retry (throttling, timeouts, 5xx)."""


class OutputLocationError(SlideScoreError):
    """The output location cannot be written (a file in the way, no permission, no bucket): no sample can
    finish, so the run stops before any work (exit code 2)."""
