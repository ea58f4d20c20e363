"""Decisions: calibration, operating points, prior shift and the sample-level call (issue #7).

Numpy only, so the pipeline can apply a :class:`~slidescore.decide.policy.DecisionPolicy` without
torch. :mod:`calibration` fits temperature / isotonic maps and computes ROC, PR, ECE and operating
points; :mod:`policy` applies a card's calibration, prior shift and thresholds to patch
probabilities; :mod:`sample_call` turns per-unit sensitivity and specificity into sample-level
figures (and back) and calls each sample; :mod:`region_points` fits operating points on regions.
Fitting is offline: ``slidescore calibrate`` and its figures live in :mod:`slidescore.offline`.
"""

from slidescore.decide.policy import DecisionPolicy
from slidescore.decide.sample_call import call_sample, sample_level, unit_level

__all__ = ["DecisionPolicy", "call_sample", "sample_level", "unit_level"]
