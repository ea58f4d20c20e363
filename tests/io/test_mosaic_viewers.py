"""What the viewers of README "Open it in …" read: the mosaic and the mask, for each encoding.

Three runs of one small slide (float32 with NaN, float32 with ``output.not_scored: -1``, uint8) are
validated with ``ome-zarr-models`` (the OME-Zarr 0.4 JSON schemas as pydantic models: images,
labels, ``omero``) and read headless with ome-zarr-py's ``Reader`` (what napari-ome-zarr uses):
scale and translation per level, the ``omero`` window as contrast limits, and the no-data value as
a viewer sees it (below the window, or NaN). slidescore's own readers (``read_level`` and the napari
viewer's layers) give NaN for "not scored" whatever the encoding. The OME-XML that Bio-Formats
(QuPath) reads is parsed for pixel size, pixel type and channel colours.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import zarr

from slidescore.config import JobConfig
from slidescore.io import mosaic as mz
from slidescore.model import load_model
from slidescore.run.local import score_samples
from tests.conftest import textured_image, write_tiff

OME_NS = {"ome": "http://www.openmicroscopy.org/Schemas/OME/2016-06"}
CELL_UM = 8.0  # 0.5 µm/px · 16 px stride
ENCODINGS = {
    "float32": {"dtype": "float32"},
    "float32_minus1": {"dtype": "float32", "not_scored": -1},
    "uint8": {"dtype": "uint8"},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, random_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("viewers")
    img = textured_image(640, 560, seed=4, fg_box=(100, 80, 360, 300))
    tif = write_tiff(root / "slide.tif", img, mpp=0.5)
    model = load_model(str(random_model_dir))
    out = {}
    for name, output in ENCODINGS.items():
        cfg = JobConfig.from_dict({"output": {"uri": str(root / name), **output}, "tiling": {"chunk_cells": 16},
                                   "report": {"enabled": False}})
        (res,) = score_samples([str(tif)], cfg, str(root / name), model=model)
        assert res.status == "ok", res.error
        out[name] = Path(res.out_dir)
    return out


def _reader_nodes(path: Path) -> list:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    return list(Reader(parse_url(str(path)))())


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_mosaic_and_mask_validate_with_ome_zarr_models(runs: dict[str, Path], name: str) -> None:
    from ome_zarr_models.v04 import Image, ImageLabel

    d = runs[name]
    img = Image.from_zarr(zarr.open_group(str(d / "probabilities.ome.zarr"), mode="r"))
    (window,) = [c.window for c in img.attributes.omero.channels]
    enc = mz.Encoding.for_output(ENCODINGS[name]["dtype"], ENCODINGS[name].get("not_scored"))
    lo, hi = (1, 255) if name == "uint8" else (0.0, 1.0)
    assert (window.start, window.end) == (lo, hi)
    assert window.min <= window.start < window.end <= window.max
    assert (window.min, window.max) == ((0, 255) if name == "uint8" else (-1.0 if name == "float32_minus1" else 0.0, 1.0))
    assert window.model_dump() == {k: pytest.approx(v) for k, v in enc.window().items()}
    ImageLabel.from_zarr(zarr.open_group(str(d / "probabilities.ome.zarr/labels/suspect"), mode="r"))
    mask = Image.from_zarr(zarr.open_group(str(d / "mask.ome.zarr"), mode="r"))
    assert [a.name for a in mask.attributes.multiscales[0].axes] == ["c", "y", "x"]


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_ome_zarr_reader_sees_scale_window_and_no_data(runs: dict[str, Path], name: str) -> None:
    from ome_zarr.reader import Multiscales

    d = runs[name]
    image = next(n for n in _reader_nodes(d / "probabilities.ome.zarr") if any(isinstance(s, Multiscales) for s in n.specs))
    n_levels = len(image.data)
    assert n_levels >= 2
    for lvl, transforms in enumerate(image.metadata["coordinateTransformations"]):
        scale = next(t["scale"] for t in transforms if t["type"] == "scale")
        trans = next(t["translation"] for t in transforms if t["type"] == "translation")
        assert scale == pytest.approx([1.0, CELL_UM * 2**lvl, CELL_UM * 2**lvl])
        n_src = 16 * 2**lvl  # source pixels (0.5 µm) per level pixel and axis
        assert trans == pytest.approx([0.0, (n_src - 1) / 2 * 0.5, (n_src - 1) / 2 * 0.5])
    assert image.metadata["channel_names"] == ["parasitized"]
    (limits,) = image.metadata["contrast_limits"]
    stored = np.asarray(image.data[0])
    prob = mz.read_level(d / "probabilities.ome.zarr", 0)
    not_scored = np.isnan(prob)
    assert 0 < not_scored.mean() < 1
    if name == "float32":
        assert limits == [0.0, 1.0] and stored.dtype == np.float32
        assert np.isnan(stored[not_scored]).all()
    elif name == "float32_minus1":
        assert limits == [0.0, 1.0] and stored.dtype == np.float32 and not np.isnan(stored).any()
        assert (stored[not_scored] == -1).all() and (stored[not_scored] < limits[0]).all()  # below the window: dark
    else:
        assert limits == [1, 255] and stored.dtype == np.uint8
        assert (stored[not_scored] == 0).all() and (stored[~not_scored] >= 1).all()  # sorts below every probability
    assert ((stored[~not_scored] >= limits[0]) & (stored[~not_scored] <= limits[1])).all()
    # an absent chunk (all "not scored") reads as the fill value, which is the no-data value
    zarray = json.loads((d / "probabilities.ome.zarr/0/.zarray").read_text())
    assert zarray["fill_value"] == {"float32": "NaN", "float32_minus1": -1.0, "uint8": 0}[name]
    assert zarr.open_group(str(d / "probabilities.ome.zarr"), mode="r").attrs["slidescore"]["encoding"] == \
        mz.Encoding.for_output(ENCODINGS[name]["dtype"], ENCODINGS[name].get("not_scored")).to_attrs()

    mask = next(n for n in _reader_nodes(d / "mask.ome.zarr") if any(isinstance(s, Multiscales) for s in n.specs))
    mscale = next(t["scale"] for t in mask.metadata["coordinateTransformations"][0] if t["type"] == "scale")
    assert mscale == pytest.approx([1.0, CELL_UM, CELL_UM])
    assert np.asarray(mask.data[0]).shape == (1, *stored.shape[1:])
    assert mask.metadata["contrast_limits"] == [[0, 255]]


def test_every_encoding_decodes_to_the_same_map_and_pyramid(runs: dict[str, Path]) -> None:
    ref = [mz.read_level(runs["float32"] / "probabilities.ome.zarr", lvl) for lvl in range(2)]
    for name in ("float32_minus1", "uint8"):
        tol = 1 / 254 / 2 + 1e-6 if name == "uint8" else 0
        for lvl in range(2):
            got = mz.read_level(runs[name] / "probabilities.ome.zarr", lvl)
            np.testing.assert_array_equal(np.isnan(got), np.isnan(ref[lvl]), err_msg=f"{name} level {lvl}")
            # level 1 of uint8 averages the rounded level 0, so it may differ by one more rounding step
            np.testing.assert_allclose(got, ref[lvl], atol=tol * (1 + lvl), equal_nan=True, err_msg=f"{name} level {lvl}")
        lab = zarr.open_group(str(runs[name] / "probabilities.ome.zarr"), mode="r")["labels/suspect/0"]
        ref_lab = zarr.open_group(str(runs["float32"] / "probabilities.ome.zarr"), mode="r")["labels/suspect/0"]
        np.testing.assert_array_equal(np.asarray(lab), np.asarray(ref_lab))


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_napari_layers_decode_not_scored_to_nan(runs: dict[str, Path], name: str) -> None:
    from slidescore.report.viewer import build_layers, close_layers

    layers = build_layers(runs[name], open_source=False)
    try:
        data, kwargs, kind = next(t for t in layers if t[1]["name"].startswith("probability: "))
        assert kind == "image" and kwargs["contrast_limits"] == (0.0, 1.0)
        lvl0 = np.asarray(data[0] if isinstance(data, list) else data)
        ref = mz.read_level(runs[name] / "probabilities.ome.zarr", 0)[0]
        assert lvl0.dtype == np.float32
        np.testing.assert_array_equal(lvl0, ref)  # NaN where not scored, the same floats elsewhere
    finally:
        close_layers(layers)


@pytest.mark.parametrize("zarr_name", ["probabilities.ome.zarr", "mask.ome.zarr"])
@pytest.mark.parametrize("name", ["float32", "uint8"])
def test_ome_xml_for_bio_formats(runs: dict[str, Path], name: str, zarr_name: str) -> None:
    d = runs[name] / zarr_name
    tree = ET.parse(d / "OME" / "METADATA.ome.xml")
    (image,) = tree.getroot().findall("ome:Image", OME_NS)
    assert image.get("ID") == "Image:0"
    (pixels,) = image.findall("ome:Pixels", OME_NS)
    arr = zarr.open_group(str(d), mode="r")["0"]
    c, h, w = arr.shape
    assert (pixels.get("SizeC"), pixels.get("SizeY"), pixels.get("SizeX"), pixels.get("SizeZ"), pixels.get("SizeT")) == \
        (str(c), str(h), str(w), "1", "1")
    assert pixels.get("Type") == {"float32": "float", "uint8": "uint8"}[np.dtype(arr.dtype).name]
    assert float(pixels.get("PhysicalSizeX")) == pytest.approx(CELL_UM) == float(pixels.get("PhysicalSizeY"))
    assert pixels.get("PhysicalSizeXUnit") == pixels.get("PhysicalSizeYUnit") == "µm"
    channels = pixels.findall("ome:Channel", OME_NS)
    assert [ch.get("ID") for ch in channels] == [f"Channel:0:{i}" for i in range(c)]
    assert all(ch.get("SamplesPerPixel") == "1" for ch in channels)
    omero = zarr.open_group(str(d), mode="r").attrs["omero"]["channels"]
    assert [ch.get("Name") for ch in channels] == [o["label"] for o in omero]
    for ch, o in zip(channels, omero, strict=True):  # the same colour as the omero metadata, as signed RGBA
        color = int(ch.get("Color"))
        assert -(2**31) <= color < 2**31
        r, g, b, a = mz.ome_color_rgba(color)
        assert f"{r:02X}{g:02X}{b:02X}" == o["color"] and a == 255
    # children in the schema's order: Channel…, then MetadataOnly
    assert [child.tag.split("}")[1] for child in pixels] == ["Channel"] * c + ["MetadataOnly"]


def test_readme_neuroglancer_state_is_json_with_upright_display_dimensions() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Open it in …", 1)[1].split("\n## ", 1)[0]
    state = json.loads(section.split("```json", 1)[1].split("```", 1)[0])
    assert state["displayDimensions"] == ["x", "y"] and state["layout"] == "xy"
    assert state["dimensions"] == {"x": [8e-06, "m"], "y": [8e-06, "m"]}  # the demo's cell: 0.5 µm/px · 16 px
    assert [layer["source"].rsplit("/", 1)[1] for layer in state["layers"]] == ["probabilities.ome.zarr", "mask.ome.zarr"]
