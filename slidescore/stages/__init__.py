"""The stages of a job, each once: plan, block (with the block recipe), finish; their layout and records.

:mod:`layout` (every output path and marker, safe ids), :mod:`plan` (ids, run keys, the resume
check, level, mask, blocks, dry run), :mod:`recipe` (pixels → cell values: the one block recipe),
:mod:`block` (read → recipe → write → marker), :mod:`finish` (pyramid, regions, files),
:mod:`overview` (the overview PNG) and :mod:`records` (typed block / sample / run records).
The runners (:mod:`slidescore.run`) drive them; see docs/architecture.md.
"""
