"""The block stage: read a block (read ahead), run the recipe, write its own chunks, then its marker.

A block owns whole output chunks; it reads its box plus the halo every patch touching those chunks
needs, so it finishes its cell values alone and a retried block rewrites the same bytes
(docs/architecture.md, invariants 2 and 6). Of that box it reads only the part its valid patches'
scoring looks at (:func:`scoring_box`). Blocks without foreground are neither read nor written.
:func:`score_blocks` is the loop both runners run: in this process (:mod:`slidescore.run.local`)
and in each Ray actor (:mod:`slidescore.run.ray`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from slidescore.core.types import Block, Box
from slidescore.io import SlideReader
from slidescore.io import mosaic as mz
from slidescore.io.base import expect_reads
from slidescore.io.outputs import exists, list_children, read_json, write_json
from slidescore.io.prefetch import prefetch
from slidescore.stages.plan import SamplePlan
from slidescore.stages.recipe import BlockRecipe
from slidescore.stages.records import BlockRecord, block_record_dict

log = logging.getLogger(__name__)


def blocks_to_read(plan: SamplePlan, blocks: Sequence[Block]) -> set[int]:
    """Indices of the blocks that still need their pixels: with foreground and no completion record.

    The blocks folder is listed once (one LIST on object storage), not looked up block by block.
    """
    todo = [b for b in blocks if plan.block_has_foreground(b)]
    done = set(list_children(plan.blocks_dir)) if todo else set()
    return {b.index for b in todo if f"{b.key}.json" not in done}


def scoring_box(plan: SamplePlan, block: Block, recipe: BlockRecipe) -> Box:
    """The part of a block (with foreground) of ``plan``'s level its scoring reads: the pixels of the dense tiles
    holding its valid patches, or of those patches' bounding box (:meth:`BlockRecipe.needed_box`)."""
    p = block.patches
    return recipe.needed_box(block.read, plan.valid[p.y : p.y1, p.x : p.x1])


def iter_block_pixels(plan: SamplePlan, blocks: Sequence[Block], reader: SlideReader, recipe: BlockRecipe,
                      depth: int, box: Callable[[Block], Box] | None = None,
                      ) -> Iterator[tuple[Block, np.ndarray | None, float | None]]:
    """``(block, pixels, read_seconds)`` in order, read ``depth`` blocks ahead in background threads.

    ``pixels`` are those of ``box(block)`` (default: the block's whole read box). The boxes of the blocks
    to be read are announced to the reader first, so the tiles their halos share are decoded once.
    ``pixels`` is ``None`` for a block that is done or has no foreground.
    """
    todo = blocks_to_read(plan, blocks)
    boxes = {b.index: b.read if box is None else box(b) for b in blocks if b.index in todo}
    expect_reads(reader, plan.level, list(boxes.values()))

    def read(b: Block) -> np.ndarray | None:
        return recipe.read(reader, plan.level, boxes[b.index]) if b.index in todo else None

    return prefetch(blocks, read, depth=depth)


def _read_marker(marker: str) -> BlockRecord | None:
    """A block's completion record, or ``None`` when it is absent or unreadable (then the block is redone)."""
    if not exists(marker):
        return None
    try:
        return BlockRecord(**{**read_json(marker), "resumed": True})
    except (ValueError, TypeError, OSError) as e:  # half-written by a crash, or another version's layout
        log.warning("block record %s is unreadable (%s: %s); scoring the block again", marker, type(e).__name__, e)
        return None


def run_block(plan: SamplePlan, block: Block, reader: SlideReader, recipe: BlockRecipe, *,
              pixels: np.ndarray | None = None, seconds_read: float | None = None) -> BlockRecord:
    """Score one block and write its own chunks; record completion after the chunks are written.

    A block without foreground costs microseconds: no read, no chunk, no completion record (its
    record says so: every patch it owns skipped as background).

    ``pixels`` (with the ``seconds_read`` they took) are the block's prepared pixels of
    :func:`scoring_box` read ahead by :func:`iter_block_pixels`; without them that box is read here.
    Outside it the block's read box is never read: the scoring does not look there, so the values are
    those of the whole box, and a retried block writes the same bytes.
    """
    p, c = block.patches, block.cells
    o = plan.grid.owned_patches(c)
    valid = plan.valid[p.y : p.y1, p.x : p.x1]
    if not valid.any():
        # no foreground: nothing to read, score or write (its chunks stay absent and read as "not scored"),
        # and no completion record — there is nothing to resume, and verify checks it against the plan
        n_owned = (min(o.y1, p.y1) - max(o.y, p.y)) * (min(o.x1, p.x1) - max(o.x, p.x))
        return BlockRecord(block.key, 0, n_owned, 0.0, 0.0, 0.0)
    marker = plan.block_marker(block)
    done = _read_marker(marker)
    if done is not None:
        return done
    n_valid = int(valid.sum())
    box = scoring_box(plan, block, recipe)
    s = recipe.stride_px
    first = ((box.y - block.read.y) // s, (box.x - block.read.x) // s)  # the block patch at the box's corner
    t0 = time.perf_counter()
    if pixels is None:
        pixels = recipe.read(reader, plan.level, box)
    t1 = time.perf_counter()
    prob = recipe.cells(pixels, valid, (p.y, p.x), c, first)
    t2 = time.perf_counter()
    mz.write_block(plan.mosaic_path, plan.mosaic, block.cells, prob)
    t3 = time.perf_counter()
    # each patch is counted by exactly one block (PatchGrid.owned_patches): counts add up over blocks
    owned = valid[max(o.y, p.y) - p.y : min(o.y1, p.y1) - p.y, max(o.x, p.x) - p.x : min(o.x1, p.x1) - p.x]
    n_owned = int(owned.sum())
    read_s = t1 - t0 if seconds_read is None else seconds_read
    rec = BlockRecord(block.key, n_owned, int(owned.size - n_owned), read_s, t2 - t1, t3 - t2, patch_evaluations=n_valid)
    write_json(marker, block_record_dict(rec))
    return rec


def score_blocks(plan: SamplePlan, blocks: Sequence[Block], reader: SlideReader, recipe: BlockRecipe,
                 depth: int) -> Iterator[BlockRecord]:
    """Score ``blocks`` of one planned image in order, reading ``depth`` blocks ahead; their records."""
    for block, pixels, read_s in iter_block_pixels(plan, blocks, reader, recipe, depth,
                                                   lambda b: scoring_box(plan, b, recipe)):
        yield run_block(plan, block, reader, recipe, pixels=pixels, seconds_read=read_s)
