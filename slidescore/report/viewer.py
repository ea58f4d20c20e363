"""``slidescore view``: the source image, the probability mosaic and the regions, aligned in napari.

:func:`build_layers` builds everything as plain napari *layer data tuples* ``(data, kwargs,
layer_type)`` without importing napari, so it runs (and is tested) headless; :func:`open_viewer`
is the only part that needs the optional ``view`` extra. World coordinates are micrometres:

* the source image is a multiscale RGB layer with ``scale = mpp0`` and no translation (pixel
  centres at ``j · mpp0``);
* each class of ``probabilities.ome.zarr`` is a multiscale layer whose ``scale`` and
  ``translate`` are the level-0 OME-Zarr ``coordinateTransformations`` (y, x part); the
  transforms of the other levels follow napari's multiscale rule (``scale · 2^l``,
  ``translate + (2^l − 1) / 2 · scale``), which is exactly how the mosaic writer defines them;
  they blend *translucently*: the colormap runs from transparent (p = 0) to the class colour
  (p = 1), so a bright-field slide is tinted where the probability is high (``additive`` blending,
  made for dark fluorescence backgrounds, washed the slide out to white there);
* ``labels/suspect`` is a labels layer with its own transforms (hidden at start);
* regions are rectangles in µm: level-0 pixel edges ``[y, y + h)`` → ``(y − ½) · mpp0`` … so they
  enclose exactly the pixels they cover, numbered by rank.

Every layer carries ``units = ("um", "um")``: napari (0.7.1 and later) labels the scale bar from the
layers' units (it showed "pixel" without them; ``ScaleBar.unit`` no longer has any effect since 0.8).

Pixels are read lazily through slidescore's own readers (:class:`LazyLevel`), level by level and
tile by tile as napari asks for them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from slidescore.core.types import Box
from slidescore.errors import ConfigError
from slidescore.io import SlideReader, open_image
from slidescore.io import mosaic as mz
from slidescore.stages.records import SampleRecord

LayerTuple = tuple[Any, dict[str, Any], str]
UNITS = ("um", "um")  # world coordinates are micrometres (pint spelling; the scale bar shows µm)


class LazyLevel:
    """An array-like view of one level of a reader: ``(h, w, c)``, or ``(h, w)`` for one channel.

    Supports the basic indexing napari uses (slices, with steps, integers and ``...``). With ``decode``
    (the mosaic's :class:`~slidescore.io.mosaic.Encoding`) stored probabilities become float32 with
    NaN for cells not scored (uint8 1…255 → 0…1, 0 → NaN; a float32 ``output.not_scored`` → NaN).
    """

    def __init__(self, reader: SlideReader, level: int, channel: int | None = None, *,
                 decode: mz.Encoding | None = None) -> None:
        info = reader.levels[level]
        self.reader, self.level, self.channel, self.decode = reader, level, channel, decode
        self.shape: tuple[int, ...] = (info.height, info.width) if channel is not None else (info.height, info.width, reader.n_channels)
        self.dtype = np.dtype(np.float32) if decode is not None else np.dtype(reader.dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):  # napari reads whole (thumbnail) levels as level[...]
            i = next(j for j, k in enumerate(key) if k is Ellipsis)
            key = key[:i] + (slice(None),) * (self.ndim - len(key) + 1) + key[i + 1 :]
        key = key + (slice(None),) * (self.ndim - len(key))
        spans = []
        post: list[Any] = []
        for k, n in zip(key[:2], self.shape[:2], strict=True):
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                stop = max(start, stop)
                spans.append((start, stop))
                post.append(slice(None, None, step))
            else:
                i = int(k) + n if int(k) < 0 else int(k)
                spans.append((i, i + 1))
                post.append(0)
        (y0, y1), (x0, x1) = spans
        pix = np.asarray(self.reader.read(self.level, Box(y0, x0, y1 - y0, x1 - x0))) if y1 > y0 and x1 > x0 else \
            np.zeros((y1 - y0, x1 - x0, self.reader.n_channels), self.reader.dtype)
        if self.channel is not None:
            pix = pix[..., self.channel]
        elif len(key) > 2:
            post.append(key[2])
        out = pix[tuple(post)]
        if self.decode is not None:
            out = mz.decode(out, self.decode)
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self[...]
        return arr if dtype is None else arr.astype(dtype)


def _zattrs(path: Path) -> dict[str, Any]:
    for name in (".zattrs", "zarr.json"):
        f = path / name
        if f.exists():
            d = json.loads(f.read_text())
            return d.get("attributes", {}).get("ome", d.get("attributes", d)) if name == "zarr.json" else d
    raise FileNotFoundError(f"{path}: no .zattrs or zarr.json; expected an OME-Zarr image written by slidescore")


def yx_transform(attrs: dict[str, Any], level: int = 0) -> tuple[tuple[float, float], tuple[float, float]]:
    """(scale, translation) of the y and x axes of one level of an OME-Zarr ``multiscales``."""
    ms = attrs["multiscales"][0]
    names = [a["name"] if isinstance(a, dict) else a for a in ms["axes"]]
    iy, ix = names.index("y"), names.index("x")
    scale, trans = [1.0] * len(names), [0.0] * len(names)
    for t in ms["datasets"][level]["coordinateTransformations"]:
        if t["type"] == "scale":
            scale = t["scale"]
        elif t["type"] == "translation":
            trans = t["translation"]
    return (float(scale[iy]), float(scale[ix])), (float(trans[iy]), float(trans[ix]))


def _colormap(name: str, rgb: tuple[int, int, int]) -> dict[str, Any]:
    r, g, b = (v / 255 for v in rgb)
    return {"name": f"slidescore {name}", "colors": [[r, g, b, 0.0], [r, g, b, 1.0]]}


def resolve_sample_dir(output: str | Path, sample: str | None = None) -> Path:
    """A sample folder from a sample folder or a run's output root (``sample`` picks one; default: the first)."""
    out = Path(output)
    if (out / "run.json").exists() and "sample_id" in json.loads((out / "run.json").read_text()):
        return out
    found = sorted(p.parent for p in out.glob("*/run.json") if (p.parent / "probabilities.ome.zarr").exists())
    if sample is not None:
        found = [p for p in found if p.name == sample]
    if not found:
        raise FileNotFoundError(
            f"{out}: no sample output found{f' named {sample!r}' if sample else ''}; pass a sample folder "
            "(with run.json and probabilities.ome.zarr) or the output root of `slidescore score`"
        )
    return found[0]


def build_layers(sample_dir: str | Path, *, image: str | None = None, open_source: bool = True) -> list[LayerTuple]:
    """napari layer data tuples for one sample's outputs (no napari import; see the module docstring).

    ``image`` overrides the source image URI recorded in run.json (e.g. when it was moved). The
    readers the layers hold stay open for the viewer's lifetime.
    """
    d = Path(sample_dir)
    run = SampleRecord.from_dict(json.loads((d / "run.json").read_text()))
    inp = run.image_input
    if inp.mpp0 is None or inp.level_mpp is None:
        raise ValueError(f"{d / 'run.json'}: names no input.mpp0 / input.level_mpp; cannot place the layers")
    mpp0 = float(inp.mpp0)
    card = run.model.card  # the card's serialisation (typed in slidescore.model.card)
    classes = list(card["classes"])
    palette = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]
    colors = [tuple(c) for c in card.get("colors") or []]
    if len(colors) != len(classes):
        colors = [palette[i % len(palette)] for i in range(len(classes))]
    layers: list[LayerTuple] = []
    uri = image or inp.uri
    if open_source:
        src = open_image(uri, backend=inp.backend or "auto")
        levels = [LazyLevel(src, i) for i in range(len(src.levels))]
        layers.append((levels if len(levels) > 1 else levels[0],
                       {"name": f"{run.sample_id} (source)", "rgb": src.n_channels in (3, 4), "multiscale": len(levels) > 1,
                        "scale": (mpp0, mpp0), "translate": (0.0, 0.0), "units": UNITS, "metadata": {"uri": uri}}, "image"))
    mosaic_path = d / (run.outputs.mosaic or "probabilities.ome.zarr")
    attrs = _zattrs(mosaic_path)
    scale, trans = yx_transform(attrs, 0)
    mos = open_image(str(mosaic_path))
    enc = mz.Encoding.from_attrs(attrs, mos.dtype)
    decode = enc if enc.dtype == "uint8" or enc.not_scored is not None else None  # float32 NaN: read as stored
    for ci, name in enumerate(classes):
        levels = [LazyLevel(mos, i, ci, decode=decode) for i in range(len(mos.levels))]
        layers.append((levels if len(levels) > 1 else levels[0],
                       {"name": f"probability: {name}", "multiscale": len(levels) > 1, "scale": scale, "translate": trans, "units": UNITS,
                        "colormap": _colormap(name, colors[ci]), "contrast_limits": (0.0, 1.0), "blending": "translucent",
                        "opacity": 0.7, "metadata": {"class": name, "threshold": run.thresholds.get(name)}}, "image"))
    labels_path = mosaic_path / "labels" / "suspect"
    if labels_path.exists():
        lscale, ltrans = yx_transform(_zattrs(labels_path), 0)
        lab = open_image(str(labels_path))
        levels = [LazyLevel(lab, i, 0) for i in range(len(lab.levels))]
        layers.append((levels if len(levels) > 1 else levels[0],
                       {"name": "suspect (thresholded)", "multiscale": len(levels) > 1, "scale": lscale, "translate": ltrans, "units": UNITS,
                        "visible": False, "opacity": 0.5}, "labels"))
    regions_file = d / "regions.json"
    if regions_file.exists():
        regions = json.loads(regions_file.read_text())["regions"]
        if regions:
            rects, edges = [], []
            for r in regions:
                y, x, h, w = r["bbox_px"]
                y0, x0 = (y - 0.5) * mpp0, (x - 0.5) * mpp0
                y1, x1 = (y + h - 0.5) * mpp0, (x + w - 0.5) * mpp0
                rects.append(np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], np.float64))
                cr, cg, cb = colors[classes.index(r["class_name"])] if r["class_name"] in classes else (255, 200, 0)
                edges.append([cr / 255, cg / 255, cb / 255, 1.0])
            layers.append((rects, {
                "name": "regions", "units": UNITS, "shape_type": "rectangle", "edge_color": edges, "face_color": [0.0, 0.0, 0.0, 0.0],
                "edge_width": run.grid.stride_px * inp.level_mpp / 2,  # half a cell
                "features": {"rank": [r["rank"] for r in regions], "class": [r["class_name"] for r in regions],
                             "peak_probability": [r["peak_probability"] for r in regions],
                             "area_um2": [r["area_um2"] for r in regions]},
                "text": {"string": "{rank}", "color": "yellow", "anchor": "upper_left", "size": 10},
            }, "shapes"))
    return layers


def close_layers(layers: list[LayerTuple]) -> None:
    """Close the readers that :func:`build_layers`'s lazy arrays hold (when the viewer is done)."""
    readers: dict[int, SlideReader] = {}
    for data, _kw, _kind in layers:
        readers.update(_readers(data))
    for reader in readers.values():
        reader.close()


def _readers(data: Any) -> dict[int, SlideReader]:
    return {id(a.reader): a.reader for a in (data if isinstance(data, list) else [data]) if isinstance(a, LazyLevel)}


def add_layers(viewer: Any, layers: list[LayerTuple]) -> list[Any]:
    """Add :func:`build_layers`'s tuples to a napari viewer (``napari.Viewer`` or a Qt-free ``ViewerModel``).

    Returns the napari layers, in the tuples' order (source, probabilities, labels, regions). A
    reader is closed when the last layer reading it leaves the viewer (``viewer.close()`` removes them all).
    """
    from napari.utils.colormaps import Colormap

    added = []
    reads: dict[int, dict[int, SlideReader]] = {}  # id(napari layer) → the readers it reads
    for data, kwargs, kind in layers:
        kw = dict(kwargs)
        if isinstance(kw.get("colormap"), dict):  # napari reads a plain dict as {name: colormap}
            kw["colormap"] = Colormap(colors=np.asarray(kw["colormap"]["colors"]), name=kw["colormap"]["name"])
        layer = getattr(viewer, f"add_{kind}")(data, **kw)
        reads[id(layer)] = _readers(data)
        added.append(layer)

    def close_unread(event: Any) -> None:
        gone = reads.pop(id(event.value), {})
        still = {rid for r in reads.values() for rid in r}
        for rid, reader in gone.items():
            if rid not in still:
                reader.close()

    viewer.layers.events.removed.connect(close_unread)
    return added


def _require_display() -> None:
    """Fail with a usage error where Qt would abort the process: Linux with no display to open a window on."""
    env = os.environ
    if sys.platform.startswith("linux") and not (env.get("DISPLAY") or env.get("WAYLAND_DISPLAY") or env.get("QT_QPA_PLATFORM")):
        raise ConfigError(
            "`slidescore view` opens a window, but this session has no display (DISPLAY and WAYLAND_DISPLAY are unset); "
            "run it on a desktop or over `ssh -X`, or copy the sample folder to a machine with a screen "
            "(its report.html opens in any browser)"
        )


def open_viewer(sample_dir: str | Path, *, image: str | None = None, block: bool = True) -> Any:
    """Open napari with :func:`build_layers`'s layers (needs ``pip install 'slidescore[view]'``).

    ``block=False`` returns the open viewer at once (scripts, notebooks, tests; ``viewer.close()``
    closes the image readers); ``block=True`` runs the Qt event loop until the window is closed,
    then closes the readers.
    """
    _require_display()
    import napari

    layers = build_layers(sample_dir, image=image)
    viewer = None
    try:
        viewer = napari.Viewer(title=f"slidescore — {Path(sample_dir).name}")
        add_layers(viewer, layers)
    except BaseException:
        if viewer is not None:
            viewer.close()
        close_layers(layers)
        raise
    # napari 0.9 moved the scale bar to viewer.canvas.overlays (viewer.scale_bar warns); its unit
    # comes from the layers' units
    overlays = getattr(getattr(viewer, "canvas", None), "overlays", None)
    (overlays.scale_bar if overlays is not None else viewer.scale_bar).visible = True
    if block:
        napari.run()
        close_layers(layers)
    return viewer
