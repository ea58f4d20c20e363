"""The pure core: geometry, masks, blending and regions, in numpy only (no files, no torch, no ray).

:mod:`types` (``Box``, ``Block``, ``LevelInfo``), :mod:`tiling` (the global patch grid and the
blocks), :mod:`mask` (foreground fractions), :mod:`blend` (the normalised convolution of patch
scores onto cells) and :mod:`regions` (threshold ▸ components ▸ rank). Siblings never import each
other except ``types``; every layer above may import them (docs/architecture.md).
"""
