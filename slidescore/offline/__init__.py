"""Offline tools, apart from the runtime: training, calibration, synthetic data and the demo.

:mod:`train` (``slidescore train``), :mod:`calibrate` (``slidescore calibrate``), :mod:`datasets`
and :mod:`plots` (their inputs and figures), :mod:`synthetic` (generated blood smears),
:mod:`train_builtin` / :mod:`calibrate_builtin` (how the built-in model was made) and :mod:`demo`
(``slidescore demo``). Nothing in the runtime layers imports this package.
"""
