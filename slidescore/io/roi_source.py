"""Reading a region-of-interest file (local or ``s3://``, through :mod:`slidescore.io.storage`) into a
:class:`~slidescore.core.roi.RoiSource`: a GeoJSON of polygons, or a mask image.

- **GeoJSON** (``.geojson`` / ``.json``): a FeatureCollection, a list of Features (QuPath's export),
  one Feature or a bare geometry; ``Polygon`` and ``MultiPolygon`` (holes included) are kept, each
  feature with its classification name (``properties.classification.name``, or QuPath's older
  ``properties.classification`` string); QuPath detections, cells and tiles (``objectType``, or
  QuPath 0.2's feature ``id`` such as ``PathDetectionObject``) and point or line geometries are
  skipped and counted. A ``crs``
  member (GeoJSON 2008: ``urn:ogc:def:crs:EPSG::32633``) marks map coordinates.
- **mask image**: PNG / JPEG (Pillow), TIFF or OME-Zarr (a labels group, via the image readers);
  nonzero in any channel = inside. OME-Zarr gives its pixel size (its ``scale``); the others are
  aligned by size (:func:`slidescore.core.roi.mask_scale`). A pyramid's finest level within
  :data:`MAX_MASK_PIXELS` is read.

Every input is hostile: the file is read up to :data:`MAX_ROI_BYTES`, JSON nesting, feature and vertex
counts are bounded, non-finite or absurd coordinates are refused; every failure is a
:class:`~slidescore.errors.RoiError` naming the file, what was expected and the fix.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from io import BytesIO
from typing import Any

import numpy as np

from slidescore.core.roi import RoiFeature, RoiMask, RoiShapes, RoiSource
from slidescore.core.types import Box
from slidescore.errors import InputError, RoiError, SlideScoreError
from slidescore.io.storage import info, open_binary, with_retries

MAX_ROI_BYTES = 256 << 20  # a GeoJSON or mask file (QuPath exports of whole-slide annotations are a few MB)
MAX_FEATURES = 200_000
MAX_VERTICES = 5_000_000  # over all rings of all features
MAX_MASK_PIXELS = 150_000_000  # one mask level held in memory (under Pillow's decompression-bomb limit)
MAX_COORD = 1e12  # beyond any image or map extent: a hostile or broken file
GEOJSON_SUFFIXES = (".geojson", ".json")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
READER_SUFFIXES = (".tif", ".tiff", ".zarr", ".zarr/")
SKIPPED_OBJECTS = ("detection", "cell", "tile")  # QuPath objects that are not regions someone drew
OLD_OBJECT_IDS = {"PathAnnotationObject": "annotation", "PathDetectionObject": "detection",  # QuPath 0.2's feature ids
                  "PathCellObject": "cell", "PathTileObject": "tile"}


def load_roi(uri: str, sample_id: str | None = None) -> RoiSource:
    """Read and parse the ROI file at ``uri`` (kind by its suffix); checksum of the bytes read.
    Errors name ``sample_id`` when given."""
    try:
        return _load(uri)
    except RoiError as e:
        if sample_id is None:
            raise
        raise RoiError(f"sample {sample_id!r}: {e}", **e.context) from None


def _load(uri: str) -> RoiSource:
    low = uri.lower().rstrip("/")
    if low.endswith(GEOJSON_SUFFIXES):
        data = _read_bytes(uri)
        return RoiSource(uri, "geojson", hashlib.sha256(data).hexdigest(), len(data), parse_geojson(data, uri))
    if low.endswith(PIL_SUFFIXES):
        data = _read_bytes(uri)
        return RoiSource(uri, "mask", hashlib.sha256(data).hexdigest(), len(data), RoiMask(_decode_pil(data, uri)))
    if low.endswith(READER_SUFFIXES):
        return _read_with_reader(uri)
    raise RoiError(f"ROI {uri}: unknown kind of file; expected a GeoJSON (.geojson/.json) or a mask image "
                   "(.png/.jpg/.tif/.tiff or an OME-Zarr labels folder .zarr)", uri=uri)


def _read_bytes(uri: str) -> bytes:
    size = int(_guard(lambda: info(uri).get("size") or 0, uri))
    if size > MAX_ROI_BYTES:
        raise RoiError(f"ROI {uri}: {size:,} bytes, more than the {MAX_ROI_BYTES:,} an ROI file may have; simplify the "
                       "annotations or export the mask at a lower resolution", uri=uri)

    def read() -> bytes:
        with open_binary(uri) as f:
            return bytes(f.read(MAX_ROI_BYTES + 1))

    data = _guard(lambda: with_retries(read, uri, "reading the ROI"), uri)
    if len(data) > MAX_ROI_BYTES:
        raise RoiError(f"ROI {uri}: more than {MAX_ROI_BYTES:,} bytes; simplify the annotations", uri=uri)
    return data


def _guard(fn: Any, uri: str) -> Any:
    """Storage errors as ROI errors (a missing ROI is the sample's problem, named as the ROI)."""
    try:
        return fn()
    except RoiError:
        raise
    except (InputError, OSError) as e:
        raise RoiError(f"ROI {uri}: cannot be read ({e}); check the path given as mask.roi / the sample's roi", uri=uri) from None


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name}")


def parse_geojson(data: bytes, uri: str) -> RoiShapes:
    """The polygons of a GeoJSON document (see the module docstring); refuses anything else with a clear error."""
    try:
        doc = json.loads(data.decode("utf-8-sig"), parse_constant=_reject_constant)
    except RecursionError:
        raise RoiError(f"ROI {uri}: JSON nested too deeply; expected a GeoJSON FeatureCollection", uri=uri) from None
    except (UnicodeDecodeError, ValueError) as e:
        raise RoiError(f"ROI {uri}: not valid JSON ({e}); expected a GeoJSON FeatureCollection of polygons "
                       "(QuPath: File › Export objects as GeoJSON)", uri=uri) from None
    features: list[RoiFeature] = []
    skipped: dict[str, int] = {}
    budget = [MAX_VERTICES]
    items: list[Any]
    if isinstance(doc, list):
        items = doc
    elif isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        items = doc.get("features") if isinstance(doc.get("features"), list) else None  # type: ignore[assignment]
        if items is None:
            raise RoiError(f"ROI {uri}: a FeatureCollection without a 'features' list", uri=uri)
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        items = [doc]
    elif isinstance(doc, dict) and doc.get("type") in ("Polygon", "MultiPolygon"):
        items = [{"type": "Feature", "geometry": doc, "properties": {}}]
    else:
        raise RoiError(f"ROI {uri}: expected a GeoJSON FeatureCollection, a list of Features, a Feature or a Polygon, "
                       f"got {type(doc).__name__}{' of type ' + repr(doc.get('type')) if isinstance(doc, dict) else ''}",
                       uri=uri)
    if len(items) > MAX_FEATURES:
        raise RoiError(f"ROI {uri}: {len(items):,} features, more than {MAX_FEATURES:,}; export only the annotations "
                       "(not detections) or merge them", uri=uri)
    for i, item in enumerate(items):
        if not isinstance(item, dict) or item.get("type") != "Feature":
            raise RoiError(f"ROI {uri}: item {i} is not a GeoJSON Feature ({_show(item)})", uri=uri)
        raw = item.get("properties")
        props: dict[str, Any] = raw if isinstance(raw, dict) else {}
        kind = str(props.get("objectType") or OLD_OBJECT_IDS.get(str(item.get("id")), "")).lower()
        geom = item.get("geometry")
        gtype = geom.get("type") if isinstance(geom, dict) else None
        if kind in SKIPPED_OBJECTS:
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        if gtype not in ("Polygon", "MultiPolygon"):
            key = str(gtype) if isinstance(gtype, str) else "no geometry"
            skipped[key] = skipped.get(key, 0) + 1
            continue
        coords = geom.get("coordinates") if isinstance(geom, dict) else None
        polys = [coords] if gtype == "Polygon" else coords
        if not isinstance(polys, list):
            raise RoiError(f"ROI {uri}: feature {i}: {gtype} coordinates must be a list, got {_show(polys)}", uri=uri)
        parsed = tuple(_polygon(p, uri, f"feature {i}", budget) for p in polys)
        features.append(RoiFeature(_class_name(props), tuple(p for p in parsed if p)))
    has_crs = isinstance(doc, dict) and "crs" in doc
    return RoiShapes(tuple(features), has_crs=has_crs, epsg=_epsg(doc.get("crs"), uri) if has_crs else None,
                     skipped=skipped)


def _class_name(props: dict[str, Any]) -> str | None:
    """QuPath's classification: ``{"name": …}`` (0.2+), a plain string (older exports); else ``None``."""
    c = props.get("classification")
    if isinstance(c, dict) and isinstance(c.get("name"), str):
        return c["name"]
    if isinstance(c, str) and c:
        return c
    return None


def _polygon(rings: Any, uri: str, where: str, budget: list[int]) -> tuple[np.ndarray, ...]:
    """A polygon's rings as closed (n, 2) float64 arrays of (x, y); a degenerate ring (< 3 points) is dropped."""
    if not isinstance(rings, list):
        raise RoiError(f"ROI {uri}: {where}: a polygon must be a list of rings, got {_show(rings)}", uri=uri)
    out: list[np.ndarray] = []
    for ring in rings:
        if not isinstance(ring, list):
            raise RoiError(f"ROI {uri}: {where}: a ring must be a list of [x, y] positions, got {_show(ring)}", uri=uri)
        budget[0] -= len(ring)
        if budget[0] < 0:
            raise RoiError(f"ROI {uri}: more than {MAX_VERTICES:,} vertices; simplify the annotations "
                           "(QuPath: Objects › Annotations › Simplify shape)", uri=uri)
        try:
            arr = np.array([p[:2] for p in ring], dtype=np.float64)
        except (TypeError, ValueError, IndexError):
            raise RoiError(f"ROI {uri}: {where}: positions must be [x, y] numbers, got {_show(ring)}", uri=uri) from None
        if arr.ndim != 2 or arr.shape[1:] != (2,) or any(isinstance(v, bool) for p in ring for v in p[:2]):
            raise RoiError(f"ROI {uri}: {where}: positions must be [x, y] numbers, got {_show(ring)}", uri=uri)
        if not np.isfinite(arr).all() or (np.abs(arr) > MAX_COORD).any():
            raise RoiError(f"ROI {uri}: {where}: coordinates must be finite numbers below {MAX_COORD:g} in size; "
                           "the file is broken", uri=uri)
        if len(arr) and not np.array_equal(arr[0], arr[-1]):
            arr = np.vstack([arr, arr[:1]])
        if len(arr) < 4:
            if not out:
                return ()  # no exterior: the polygon is empty
            continue
        out.append(arr)
    return tuple(out)


def _epsg(crs: Any, uri: str) -> int | None:
    """The EPSG code of a GeoJSON 2008 ``crs`` member (``None``: CRS84 / unnamed)."""
    name = crs.get("properties", {}).get("name") if isinstance(crs, dict) and isinstance(crs.get("properties"), dict) else None
    if not isinstance(name, str):
        raise RoiError(f"ROI {uri}: a 'crs' member without properties.name ({_show(crs)}); expected e.g. "
                       "{\"type\": \"name\", \"properties\": {\"name\": \"urn:ogc:def:crs:EPSG::32633\"}}", uri=uri)
    tail = name.replace("::", ":").rsplit(":", 1)[-1]
    if "CRS84" in name.upper():
        return 4326
    if tail.isdigit():
        return int(tail)
    raise RoiError(f"ROI {uri}: cannot read an EPSG code from crs name {name!r}; expected urn:ogc:def:crs:EPSG::<code>", uri=uri)


def _decode_pil(data: bytes, uri: str) -> np.ndarray:
    from PIL import Image

    try:
        with warnings.catch_warnings():  # the pixel count is bounded here, below Pillow's own bomb check
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(BytesIO(data))
            w, h = im.size
            if w * h > MAX_MASK_PIXELS:
                raise RoiError(f"ROI {uri}: a {w}×{h} mask image, more than {MAX_MASK_PIXELS:,} pixels; export it at a "
                               "lower resolution (the mask is aligned by its size)", uri=uri)
            arr = np.asarray(im)
    except RoiError:
        raise
    except Exception as e:  # Pillow raises many types on corrupt files
        raise RoiError(f"ROI {uri}: cannot be decoded as a mask image ({type(e).__name__}: {e}); expected a PNG/JPEG/TIFF "
                       "whose nonzero pixels are inside", uri=uri) from None
    return _inside(arr)


def _inside(arr: np.ndarray) -> np.ndarray:
    return np.asarray(arr != 0 if arr.ndim == 2 else (arr != 0).any(axis=-1))


def _read_with_reader(uri: str) -> RoiSource:
    """A TIFF or OME-Zarr mask through slidescore's image readers: the finest level within the pixel limit."""
    from slidescore.io.open import open_image

    try:
        reader = open_image(uri)
    except SlideScoreError as e:
        raise RoiError(f"ROI {uri}: cannot be read as a mask image ({e})", uri=uri) from None
    try:
        fits = [lv for lv in reader.levels if lv.height * lv.width <= MAX_MASK_PIXELS]
        if not fits:
            lv0 = reader.levels[0]
            raise RoiError(f"ROI {uri}: a {lv0.width}×{lv0.height} mask without a level under {MAX_MASK_PIXELS:,} pixels; "
                           "export it at a lower resolution", uri=uri)
        lv = fits[0]
        try:
            arr = reader.read(lv.index, Box(0, 0, lv.height, lv.width))
        except SlideScoreError as e:
            raise RoiError(f"ROI {uri}: cannot be read ({e})", uri=uri) from None
        px_um = None
        if uri.lower().rstrip("/").endswith(".zarr") and reader.mpp is not None:  # OME-Zarr: its scale, in µm
            lv0 = reader.levels[0]
            px_um = (reader.mpp * lv0.height / lv.height, reader.mpp * lv0.width / lv.width)
        inside = _inside(np.asarray(arr))
    finally:
        reader.close()
    # the checksum of the decoded mask (a Zarr folder has no one file to hash); the run key includes it
    hashed = np.packbits(inside).tobytes() + repr(inside.shape).encode()
    return RoiSource(uri, "mask", hashlib.sha256(hashed).hexdigest(), len(hashed), RoiMask(inside, px_um))


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"
