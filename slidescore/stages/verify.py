"""Before a sample is finished: level 0 of each mosaic holds every value its block records promise.

Block markers are written after their chunks, but a disk may still lose or truncate a chunk after
its marker (a power cut before the page cache reaches the disk, an operator's clean-up, a bucket
lifecycle rule). Finishing would then build a pyramid over holes and mark it complete.
:func:`read_level0_verified` reads level 0 and checks it against the plan: a chunk that no longer
decodes, or a cell that a valid patch covers but that holds no value, fails the sample with the
blocks named — and their completion records are removed first, so a rerun rescores just those
blocks (docs/architecture.md, invariant 6).
"""

from __future__ import annotations

import logging

import numpy as np

from slidescore.core.types import Block, Box
from slidescore.errors import InputError, TransientStorageError
from slidescore.io import mosaic as mz
from slidescore.io.outputs import remove
from slidescore.stages.plan import SamplePlan

log = logging.getLogger(__name__)


def read_level0_verified(plan: SamplePlan) -> np.ndarray:
    """Level 0 of the image's mosaic as probabilities, after checking it is whole (see the module docstring)."""
    try:
        prob = mz.read_box(plan.mosaic_path, 0, Box(0, 0, *plan.grid.cells_shape))  # probabilities and labels
    except TransientStorageError:
        raise
    except Exception as e:  # noqa: BLE001 — a chunk that does not decode: find which, then say so
        bad = [b for b in plan.blocks if plan.block_has_foreground(b) and not _readable(plan, b)]
        if not bad:
            raise
        _forget(plan, bad)
        raise InputError(
            f"sample {plan.sample_id!r} ({plan.uri}): {len(bad)} block(s) of the mosaic {plan.mosaic_path} no longer decode "
            f"({type(e).__name__}: {e}) — chunks truncated or overwritten after they were written (blocks "
            f"{_names(bad)}); their completion records were removed: run again to rescore those blocks",
            uri=plan.uri) from None
    covered = plan.grid.covered_cells(plan.valid)
    missing = covered & np.isnan(prob).all(axis=0)
    if missing.any():
        bad = [b for b in plan.blocks if missing[b.cells.y : b.cells.y1, b.cells.x : b.cells.x1].any()]
        _forget(plan, bad)
        raise InputError(
            f"sample {plan.sample_id!r} ({plan.uri}): {int(missing.sum())} scored cells have no value in {plan.mosaic_path} "
            f"— chunks lost after their blocks were recorded (blocks {_names(bad)}); their completion records were "
            "removed: run again to rescore those blocks", uri=plan.uri)
    return prob


def _readable(plan: SamplePlan, block: Block) -> bool:
    try:
        mz.read_box(plan.mosaic_path, 0, block.cells)
    except TransientStorageError:
        raise
    except Exception:  # noqa: BLE001 — any decoding error marks the block's chunks as bad
        return False
    return True


def _forget(plan: SamplePlan, blocks: list[Block]) -> None:
    for b in blocks:
        log.warning("sample %s: removing the completion record of block %s (its chunks are missing or corrupt)",
                    plan.sample_id, b.key)
        remove(plan.block_marker(b))


def _names(blocks: list[Block]) -> str:
    keys = [b.key for b in blocks]
    return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
