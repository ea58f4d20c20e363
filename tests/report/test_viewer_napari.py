"""The viewer in a real napari (the optional ``view`` extra; skipped where napari is not installed).

Layer names, kinds, µm scales and units, multiscale levels, and the region rectangles on the pixels
they cover, checked on napari's own layers: once in a Qt-free ``ViewerModel`` and once through
:func:`open_viewer` (``block=False``) with a Qt window, ``QT_QPA_PLATFORM=offscreen`` unless the
environment sets a platform (e.g. ``xcb`` under ``xvfb-run``, where the pixels are checked too).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from slidescore.report.viewer import add_layers, build_layers, close_layers, open_viewer

with warnings.catch_warnings():  # napari's and npe2's pydantic-v1-style models warn as they are built
    warnings.simplefilter("ignore", DeprecationWarning)
    pytest.importorskip("napari")
    from napari.components import ViewerModel


def _check_napari_layers(layers, res) -> None:
    sample_id, mpp0 = res.sample_id, res.run["input"]["mpp0"]
    kinds = [(type(layer).__name__, layer.name) for layer in layers]
    assert kinds == [("Image", f"{sample_id} (source)"), ("Image", "probability: parasitized"),
                     ("Labels", "suspect (thresholded)"), ("Shapes", "regions")]
    for layer in layers:
        assert [str(u) for u in layer.units] == ["micrometer", "micrometer"], layer.name

    src = layers[f"{sample_id} (source)"]
    assert src.rgb and src.multiscale and len(src.data) >= 2
    assert tuple(src.scale) == (mpp0, mpp0) and tuple(src.translate) == (0.0, 0.0)
    assert src.data[0].shape == (1536, 1536, 3)

    prob = layers["probability: parasitized"]
    cell_um = res.run["grid"]["stride_px"] * res.run["input"]["level_mpp"]
    assert prob.multiscale and len(prob.data) >= 2 and prob.data[0].shape == (1536 * mpp0 / cell_um,) * 2
    assert tuple(prob.scale) == (cell_um, cell_um)
    assert tuple(prob.translate) == pytest.approx(((cell_um - mpp0) / 2,) * 2)  # a cell's centre = its pixels' centre
    assert prob.blending == "translucent" and tuple(prob.contrast_limits) == (0.0, 1.0)
    assert prob.colormap.colors[0][3] == 0.0 and prob.colormap.colors[-1][3] == 1.0
    labels = layers["suspect (thresholded)"]
    assert not labels.visible and tuple(labels.scale) == tuple(prob.scale) and tuple(labels.translate) == tuple(prob.translate)

    shapes = layers["regions"]
    assert len(shapes.data) == len(res.regions) > 0 and set(shapes.shape_type) == {"rectangle"}
    assert list(shapes.features["rank"]) == [r.rank for r in res.regions]
    for rect, r in zip(shapes.data, res.regions, strict=True):
        y, x, h, w = r.bbox_px
        # the corners are the outer edges of the region's level-0 pixels, in the source layer's data space
        corners = np.array([src.world_to_data(c) for c in rect])
        np.testing.assert_allclose(corners.min(0), [y - 0.5, x - 0.5], atol=1e-9)
        np.testing.assert_allclose(corners.max(0), [y + h - 0.5, x + w - 0.5], atol=1e-9)
        # and the mosaic cell under the region's peak (world µm) holds its peak probability
        cy, cx = np.round(prob.world_to_data(np.asarray(r.peak_px) * mpp0)).astype(int)
        assert float(prob.data[0][cy, cx]) == pytest.approx(r.peak_probability, abs=1 / 254)
        assert labels.data[0][cy, cx] > 0


def _open_files() -> set[str]:
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.is_dir():
        pytest.skip("no /proc/self/fd to list this process's open files")
    out = set()
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):  # closed between listing and reading
            out.add(os.readlink(fd))
    return out


def test_layers_in_a_napari_viewer_model(scored_batch) -> None:
    _, results = scored_batch
    res = results[0]
    tuples = build_layers(Path(res.out_dir))
    viewer = ViewerModel()
    try:
        added = add_layers(viewer, tuples)
        assert list(viewer.layers) == added
        _check_napari_layers(viewer.layers, res)
    except BaseException:
        close_layers(tuples)
        raise
    tif = str(Path(res.run["input"]["uri"]).resolve())
    assert tif in _open_files()
    viewer.layers.clear()  # the last layer reading each reader left: add_layers closed them
    assert tif not in _open_files()


def _opengl_or_skip() -> None:
    """Skip when Qt gets no OpenGL context (e.g. the offscreen platform without an X display)."""
    from napari.qt import get_qapp
    from qtpy.QtGui import QOffscreenSurface, QOpenGLContext

    get_qapp()
    ctx, surface = QOpenGLContext(), QOffscreenSurface()
    surface.create()
    ok = ctx.create() and surface.isValid() and ctx.makeCurrent(surface) and len(ctx.extensions()) > 0
    if ok:
        ctx.doneCurrent()
    if not ok:
        pytest.skip(f"no OpenGL context on Qt platform {os.environ['QT_QPA_PLATFORM']!r} (napari's canvas needs one; try xvfb-run)")


def test_open_viewer_shows_the_regions_on_the_slide(scored_batch, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QT_QPA_PLATFORM", os.environ.get("QT_QPA_PLATFORM") or "offscreen")
    _opengl_or_skip()
    from napari.qt import get_qapp

    _, results = scored_batch
    res = results[0]
    viewer = open_viewer(res.out_dir, block=False)
    try:
        assert viewer.title.endswith(res.sample_id)
        _check_napari_layers(viewer.layers, res)
        overlays = getattr(getattr(viewer, "canvas", None), "overlays", None)  # napari 0.9 moved the scale bar
        assert (overlays.scale_bar if overlays is not None else viewer.scale_bar).visible
        # centre the camera on the middle of region 1's left edge, zoomed so the edge is many pixels wide
        mpp0 = res.run["input"]["mpp0"]
        y, x, h, _w = res.regions[0].bbox_px
        viewer.window.resize(800, 700)
        camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # napari 0.9 moved it
        camera.center = ((y + h / 2 - 0.5) * mpp0, (x - 0.5) * mpp0)
        camera.zoom = 8.0
        viewer.layers["regions"].opacity = 1.0  # the edge's own colour, not blended with the slide
        for _ in range(20):
            get_qapp().processEvents()
        shot = viewer.screenshot(canvas_only=True, flash=False)
        assert shot.ndim == 3 and shot.shape[2] == 4 and min(shot.shape[:2]) > 100
        if os.environ["QT_QPA_PLATFORM"] != "offscreen":  # Qt's offscreen platform draws no OpenGL pixels
            cy, cx = shot.shape[0] // 2, shot.shape[1] // 2
            edge = np.asarray(viewer.layers["regions"].edge_color[0][:3]) * 255
            np.testing.assert_allclose(shot[cy - 2 : cy + 3, cx - 2 : cx + 3, :3].mean((0, 1)), edge, atol=12)
            # 5 µm inside the edge (a region is at least one 8 µm cell wide): the slide, drawn, not black
            assert shot[cy - 2 : cy + 3, cx + 38 : cx + 43, :3].mean() > 60
    finally:
        viewer.close()
    assert str(Path(res.run["input"]["uri"]).resolve()) not in _open_files()  # closing the viewer closed the readers
