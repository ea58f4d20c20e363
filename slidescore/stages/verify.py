"""Before a sample is finished: level 0 of each mosaic holds every value its block records promise.

Block markers are written after their chunks, but a disk may still lose or truncate a chunk after
its marker (a power cut before the page cache reaches the disk, an operator's clean-up, a bucket
lifecycle rule). Finishing would then build a pyramid over holes and mark it complete.
:func:`read_level0_verified` reads level 0 block by block — the blocks with foreground only: the
others have no chunks and no completion record by design — and checks it against the plan: a chunk that no longer
decodes, or a cell that a valid patch covers but that holds no value, fails the sample with the
blocks named — and their completion records are removed first, so a rerun rescores just those
blocks (docs/architecture.md, invariant 6).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from slidescore.core.types import Block, Box
from slidescore.errors import InputError, TransientStorageError
from slidescore.io import mosaic as mz
from slidescore.io.outputs import remove
from slidescore.stages.plan import SamplePlan

log = logging.getLogger(__name__)


def read_level0_verified(plan: SamplePlan) -> np.ndarray:
    """Level 0 of the image's mosaic as probabilities, after checking it is whole (see the module docstring).

    Only the blocks with foreground are read and checked: a block without any has no chunks and no
    completion record by design (:func:`slidescore.stages.block.run_block`), and its cells are "not
    scored" (NaN) without a read. Each block is read and checked on its own, so the memory beyond
    the returned level is one block's.
    """
    prob = np.full((plan.mosaic.shape[0], *plan.grid.cells_shape), np.nan, np.float32)
    undecodable: list[Block] = []
    missing: list[Block] = []
    n_missing = 0
    first_error: Exception | None = None
    read: Callable[[Box], np.ndarray] | None = None  # the mosaic opened once, at the first block with foreground
    for b in plan.blocks:
        c = b.cells
        if not plan.block_has_foreground(b):
            continue
        try:
            read = read or mz.box_reader(plan.mosaic_path, 0)
            values = read(c)  # probabilities and labels
        except TransientStorageError:
            raise
        except Exception as e:  # noqa: BLE001 — a chunk that does not decode: name its block, then say so
            undecodable.append(b)
            first_error = first_error or e
            continue
        prob[:, c.y : c.y1, c.x : c.x1] = values
        lost = covered_in_block(plan, b) & np.isnan(values).all(axis=0)
        if lost.any():
            missing.append(b)
            n_missing += int(lost.sum())
    if undecodable:
        _forget(plan, undecodable)
        why = f"{type(first_error).__name__}: {first_error}"
        raise InputError(
            f"sample {plan.sample_id!r} ({plan.uri}): {len(undecodable)} block(s) of the mosaic {plan.mosaic_path} no longer "
            f"decode ({why}) — chunks truncated or overwritten after they were written (blocks "
            f"{_names(undecodable)}); their completion records were removed: run again to rescore those blocks",
            uri=plan.uri)
    if missing:
        _forget(plan, missing)
        raise InputError(
            f"sample {plan.sample_id!r} ({plan.uri}): {n_missing} scored cells have no value in {plan.mosaic_path} "
            f"— chunks lost after their blocks were recorded (blocks {_names(missing)}); their completion records were "
            "removed: run again to rescore those blocks", uri=plan.uri)
    return prob


def covered_in_block(plan: SamplePlan, block: Block) -> np.ndarray:
    """(h, w) bool: the block's cells that at least one valid patch covers — ``PatchGrid.covered_cells``
    restricted to the block, from the block's own patches (cell i: its patches i … i + k − 1, block-local)."""
    p, c, k = block.patches, block.cells, plan.grid.k
    valid = plan.valid[p.y : p.y1, p.x : p.x1]
    window = np.lib.stride_tricks.sliding_window_view(valid, (k, k))
    return np.asarray(window.any(axis=(2, 3)))[: c.h, : c.w]


def covered_cell_count(plan: SamplePlan) -> int:
    """Number of cells a valid patch covers (``PatchGrid.covered_cells(valid).sum()``), block by block:
    no full-canvas array, and nothing computed for blocks without foreground."""
    return sum(int(covered_in_block(plan, b).sum()) for b in plan.blocks if plan.block_has_foreground(b))


def _forget(plan: SamplePlan, blocks: list[Block]) -> None:
    for b in blocks:
        log.warning("sample %s: removing the completion record of block %s (its chunks are missing or corrupt)",
                    plan.sample_id, b.key)
        remove(plan.block_marker(b))


def _names(blocks: list[Block]) -> str:
    keys = [b.key for b in blocks]
    return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
