"""The centred grid: an object at the image edge gives the same region as the same object inside.

With patches only from origin 0, cells near an edge were covered by fewer patches, all holding the
object, and the normalised blend spread the region to the border (832 µm² inside vs 1,536 at the edge
on the demo smear). Every cell is now covered by the same k² patch positions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import slidescore
from slidescore.core.regions import find_regions


class HasDarkSpot(nn.Module):
    """(N, 3, P, P) in [0, 1] → (N, 1): 1 when the patch holds a dark pixel, else 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, 0].amin(dim=(1, 2)) < 0.5).float()[:, None]


@pytest.mark.parametrize("side", ["top", "left", "bottom", "right"])
def test_the_map_around_a_spot_near_the_edge_equals_the_map_around_the_same_spot_inside(side: str) -> None:
    """A spot 10 px from an edge and the same spot inside (same offset within a cell): every cell
    between the spot and the edge, and around it, has the value of its counterpart inside — the old
    grid gave the cells towards the edge the spot's own value (1.0 instead of 0.75), spreading the
    region to the border."""
    h = w = 256
    spot, s = 6, 8
    img = np.full((h, w, 3), 255, np.uint8)
    near = {"top": (10, 130), "left": (130, 10), "bottom": (h - 10 - spot, 120), "right": (120, w - 10 - spot)}[side]
    inner = (130, 130) if side in ("top", "left") else (h - 130 - spot, w - 130 - spot)
    assert near[0] % s == inner[0] % s and near[1] % s == inner[1] % s
    for y, x in (near, inner):
        img[y : y + spot, x : x + spot] = 20
    prob = slidescore.score_array(img, HasDarkSpot(), patch_px=32, stride_px=s, pad_value=255, device="cpu")[0]
    assert np.isfinite(prob).all()  # every cell covered (no mask)
    dy, dx = (inner[0] - near[0]) // s, (inner[1] - near[1]) // s
    cy, cx = near[0] // s, near[1] // s
    for y in range(max(0, cy - 4), min(prob.shape[0], cy + 5)):
        for x in range(max(0, cx - 4), min(prob.shape[1], cx + 5)):
            assert prob[y, x] == pytest.approx(prob[y + dy, x + dx], abs=1e-6), (side, y, x)
    # the regions: the one near the edge is the inside one cut by the border, never larger
    regions = find_regions(prob[None], ("spot",), (0.5,), cell_px0=s, mpp0=1.0)
    assert len(regions) == 2
    by_dist = sorted(regions, key=lambda r: min(r.bbox_px[0], r.bbox_px[1], h - r.bbox_px[0] - r.bbox_px[2],
                                                  w - r.bbox_px[1] - r.bbox_px[3]))
    assert by_dist[0].area_um2 <= by_dist[1].area_um2


def test_a_cell_near_the_edge_blends_as_many_patches_as_one_inside() -> None:
    """Uniform blending of a patch indicator: the share of covering patches that hold the spot is the
    same for a cell next to an edge spot as for the same cell next to an inside spot."""
    img = np.full((128, 128, 3), 255, np.uint8)
    img[0:4, 60:64] = 20  # touching the top edge
    img[60:64, 60:64] = 20  # inside
    prob = slidescore.score_array(img, HasDarkSpot(), patch_px=32, stride_px=8, pad_value=255, device="cpu")[0]
    # the cell holding each spot, and the cell one row further from it on the side away from the edge
    np.testing.assert_allclose(prob[0, 7], prob[7, 7], atol=1e-6)
    np.testing.assert_allclose(prob[1, 7], prob[8, 7], atol=1e-6)
