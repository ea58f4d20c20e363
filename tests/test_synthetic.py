"""Tests of the synthetic blood-smear generator: determinism, geometry, and plausible content."""

from __future__ import annotations

import numpy as np
import pytest

from slidescore.errors import ConfigError
from slidescore.offline import synthetic as syn


@pytest.fixture(scope="module")
def layout() -> syn.SmearLayout:
    return syn.plan_smear(syn.SmearSpec(1536, 1280, seed=7, parasitemia=0.05))


@pytest.fixture(scope="module")
def big_layout() -> syn.SmearLayout:
    return syn.plan_smear(syn.SmearSpec(4096, 4096, seed=11))


def test_same_spec_same_layout_and_pixels(layout: syn.SmearLayout) -> None:
    again = syn.plan_smear(layout.spec)
    np.testing.assert_array_equal(again.rbc_centers, layout.rbc_centers)
    np.testing.assert_array_equal(syn.parasite_positions(again), syn.parasite_positions(layout))
    np.testing.assert_array_equal(
        syn.render_region(again, 100, 200, 300, 256), syn.render_region(layout, 100, 200, 300, 256)
    )


def test_other_seed_other_smear(layout: syn.SmearLayout) -> None:
    other = syn.plan_smear(syn.SmearSpec(1536, 1280, seed=8, parasitemia=0.05))
    assert not np.array_equal(
        syn.render_region(other, 0, 0, 256, 256), syn.render_region(layout, 0, 0, 256, 256)
    )


@pytest.mark.parametrize("downsample", [1, 2, 4])
def test_region_equals_crop_of_whole_level(layout: syn.SmearLayout, downsample: int) -> None:
    whole = syn.render_image(layout, downsample)
    assert whole.shape == (*syn.level_shape(layout.spec, downsample), 3) and whole.dtype == np.uint8
    y, x, h, w = 37 // downsample + 5, 211 // downsample + 3, 301 // downsample, 157 // downsample
    np.testing.assert_array_equal(
        syn.render_region(layout, y, x, h, w, downsample), whole[y : y + h, x : x + w]
    )


@pytest.mark.parametrize("downsample", [1, 2])
def test_tiles_assemble_to_the_whole_level(layout: syn.SmearLayout, downsample: int) -> None:
    whole = syn.render_image(layout, downsample)
    tiled = np.zeros_like(whole)
    tile = 97  # odd, so tile edges cut through many cells
    for y in range(0, whole.shape[0], tile):
        for x in range(0, whole.shape[1], tile):
            tiled[y : y + tile, x : x + tile] = syn.render_region(
                layout,
                y,
                x,
                min(tile, whole.shape[0] - y),
                min(tile, whole.shape[1] - x),
                downsample,
            )
    np.testing.assert_array_equal(tiled, whole)


def test_downsampled_level_matches_mean_pooled_level0(layout: syn.SmearLayout) -> None:
    level0 = syn.render_region(layout, 0, 0, 512, 512).astype(float)
    pooled = level0.reshape(256, 2, 256, 2, 3).mean((1, 3))
    level1 = syn.render_region(layout, 0, 0, 256, 256, downsample=2).astype(float)
    assert np.abs(pooled - level1).mean() < 2.0


def test_parasites_lie_in_their_red_cells_and_are_dark(layout: syn.SmearLayout) -> None:
    dots = syn.parasite_positions(layout)
    assert len(dots) == len(layout.parasite_cells) == layout.parasitized.sum() > 5
    centres = layout.rbc_centers[layout.parasite_cells]
    radii = layout.rbc_radii[layout.parasite_cells]
    assert (np.hypot(*(dots - centres).T) < 0.9 * radii).all()
    img = syn.render_image(layout)
    for yy, xx in dots.astype(int)[:20]:
        # chromatin is dark purple: much darker in green than any plain red cell or background
        assert img[yy - 1 : yy + 2, xx - 1 : xx + 2, 1].min() < 90
        assert (
            img[yy - 1 : yy + 2, xx - 1 : xx + 2, 2].min()
            > img[yy - 1 : yy + 2, xx - 1 : xx + 2, 1].min()
        )


def test_parasitemia_and_spacing(big_layout: syn.SmearLayout) -> None:
    spec = big_layout.spec
    n_rbc = len(big_layout.rbc_centers)
    n_par = len(syn.parasite_positions(big_layout))
    assert abs(n_par / n_rbc - spec.parasitemia) < 0.2 * spec.parasitemia
    dots = syn.parasite_positions(big_layout)
    d = np.hypot(*(dots[:, None] - dots[None]).transpose(2, 0, 1))
    np.fill_diagonal(d, np.inf)
    assert d.min() >= spec.min_parasite_distance_um / spec.mpp


def test_background_fraction_gaps_and_platelets(big_layout: syn.SmearLayout) -> None:
    img = syn.render_image(big_layout, downsample=4).astype(int)
    bright = (img.min(2) > 215) & (img.max(2) - img.min(2) < 12)
    assert 0.35 < bright.mean() < 0.75
    bg = img[bright].mean(0)
    assert np.abs(bg - [235, 235, 232]).max() < 6
    # every gap is empty: all its pixels are background
    assert len(big_layout.gap_radii) >= 1
    yy, xx = (np.mgrid[: img.shape[0], : img.shape[1]] + 0.5) * 4
    for (cy, cx), r in zip(big_layout.gap_centers, big_layout.gap_radii, strict=True):
        inside = np.hypot(yy - cy, xx - cx) < r - 8
        assert inside.sum() > 100 and bright[inside].mean() > 0.97
    # platelets lie between the cells, not on them
    from scipy.spatial import cKDTree

    dist, j = cKDTree(big_layout.rbc_centers).query(big_layout.platelet_centers)
    assert len(dist) > 50 and (dist > big_layout.rbc_radii[j]).all()
    assert len(big_layout.wbc_centers) >= 1


def test_coverage_controls_cell_density() -> None:
    fracs = []
    for cov in (0.3, 0.55):
        lay = syn.plan_smear(syn.SmearSpec(2048, 2048, seed=3, coverage=cov))
        img = syn.render_image(lay, downsample=4)
        fracs.append(1 - (img.min(2) > 215).mean())
    assert fracs[0] < fracs[1]
    assert 0.2 < fracs[0] < 0.45 and 0.4 < fracs[1] < 0.7


def test_bad_spec_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="height_px"):
        syn.SmearSpec(0, 100)
    with pytest.raises(ConfigError, match="parasitemia"):
        syn.SmearSpec(100, 100, parasitemia=1.5)
