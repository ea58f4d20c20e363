"""The runners: one sample lifecycle (:mod:`lifecycle`) driven in one process (:mod:`local`) or on Ray (:mod:`ray`).

``from slidescore.run import score_samples`` is the single-process entry point; the Ray runner is
:func:`slidescore.run.ray.score_samples_ray` (imported on demand: it imports ray).
"""

from slidescore.run.local import score_sample, score_samples

__all__ = ["score_sample", "score_samples"]
