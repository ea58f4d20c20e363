"""The sections of a job config (model, tiling, blending, mask, regions, input, output, decision,
report, cluster, limits): frozen dataclasses with their defaults, each with a
``validate(prefix)`` that raises :class:`~slidescore.errors.ConfigError` naming the dotted key, plus
the shared value checks (:func:`_number`, :func:`_positive_int`, :func:`_one_of`) and the
input-conversion check :func:`check_conversion`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from slidescore.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    """Which model to run and how.

    ``name`` is ``builtin:<name>``, a model package folder (``card.json`` + ``weights.safetensors``,
    ``weights.pt``, ``model.onnx``, ``model.pt2`` or ``model.ts``), a WSInfer-zoo folder (``config.json``
    + ``torchscript_model.pt``), or a model file (``.onnx``, ``.pt2``, ``.safetensors``, TorchScript
    ``.pt``/``.ts``) with ``<file>.card.json``, ``<stem>.card.json`` or ``card.json`` beside it; ``card``
    names the card's JSON file instead (for a file that has none beside it). ``mode``: ``auto`` scores densely
    when the card declares a dense-capable network (checked once against per-patch scoring, with a
    fallback), ``dense`` insists (an error if the check fails), ``per_patch`` never does.
    ``channels_last``: run the network in NHWC memory (default ``null`` = on; 1.4–1.8× faster on CPU
    for the built-in networks, docs/benchmarks.md; ``false`` for NCHW). ``amp``
    (``off``/``bf16``/``fp16``) and ``compile`` apply on CUDA only and are ignored, with a log line,
    on CPU. ``prefetch_blocks``: blocks read and decoded ahead in
    background threads while the model runs (0 = off; default: 2 on a GPU or for object-storage
    inputs, 0 for local files scored on CPU). ``dense_tile_px``: dense scoring runs the
    network over tiles of about this edge plus the patch halo (identical scores; default 1024 on CPU,
    where larger tiles fall out of cache, and 4096 on CUDA).
    """

    name: str = "builtin:smearnet"
    card: str | None = None
    device: str = "auto"
    batch_size: int = 256
    mode: str = "auto"
    amp: str = "off"
    channels_last: bool | None = None
    compile: bool = False
    prefetch_blocks: int | None = None
    dense_tile_px: int | None = None

    def validate(self, prefix: str) -> None:
        _positive_int(self.batch_size, f"{prefix}.batch_size")
        if self.card is not None and not self.card.strip():
            raise ConfigError(f"{prefix}.card: expected the path of a model card (JSON) or null, got {self.card!r}")
        if self.dense_tile_px is not None:
            _positive_int(self.dense_tile_px, f"{prefix}.dense_tile_px")
        _one_of(self.device, ("auto", "cpu", "cuda"), f"{prefix}.device", prefix_ok="cuda:")
        _one_of(self.mode, ("auto", "dense", "per_patch"), f"{prefix}.mode")
        _one_of(self.amp, ("off", "bf16", "fp16"), f"{prefix}.amp")
        if self.channels_last is not None and not isinstance(self.channels_last, bool):
            raise ConfigError(f"{prefix}.channels_last: expected true, false or null (auto: on), got {self.channels_last!r}")
        if self.prefetch_blocks is not None and (isinstance(self.prefetch_blocks, bool) or not isinstance(self.prefetch_blocks, int)
                                                 or self.prefetch_blocks < 0):
            raise ConfigError(f"{prefix}.prefetch_blocks: expected an int >= 0 (0 = read each block when it is scored) "
                              f"or null (auto: 2 on a GPU or for s3:// inputs, else 0), got {self.prefetch_blocks!r}")

    def prefetch_depth(self, device_type: str, remote_input: bool = False) -> int:
        """Blocks to read ahead: as configured, else 2 when it overlaps waiting with work (a model on
        a GPU, or an input on object storage whose reads wait on the network) and 0 for a local file
        scored on CPU, where the model's threads use every core and a reader only slows them."""
        if self.prefetch_blocks is not None:
            return self.prefetch_blocks
        return 2 if device_type == "cuda" or remote_input else 0

    def runtime_options(self) -> dict[str, Any]:
        """Keyword arguments of ``load_model`` beyond the name: device, the CUDA options and ``card`` when given."""
        return {"device": self.device, "amp": self.amp, "channels_last": self.channels_last, "compile": self.compile,
                "dense_tile_px": self.dense_tile_px, **({"card": self.card} if self.card is not None else {})}


@dataclass(frozen=True)
class TilingConfig:
    """The patch grid and the work decomposition.

    ``stride_px`` is the distance between patch origins at the scoring level and the size of one
    output cell; it must divide the model's ``patch_px``. The mosaic is chunked in squares of
    ``chunk_cells`` cells; a block (unit of work) is ``block_chunks`` × ``block_chunks`` chunks.
    """

    stride_px: int = 16
    chunk_cells: int = 128
    block_chunks: int = 1

    def validate(self, prefix: str) -> None:
        _positive_int(self.stride_px, f"{prefix}.stride_px")
        _positive_int(self.chunk_cells, f"{prefix}.chunk_cells")
        _positive_int(self.block_chunks, f"{prefix}.block_chunks")


@dataclass(frozen=True)
class BlendingConfig:
    """How overlapping patch probabilities are averaged per cell."""

    weights: str = "uniform"
    sigma_frac: float = 0.125

    def validate(self, prefix: str) -> None:
        _one_of(self.weights, ("uniform", "gaussian", "cosine"), f"{prefix}.weights")
        _number(self.sigma_frac, f"{prefix}.sigma_frac", "a number in (0, 1]", lambda v: 0 < v <= 1)


@dataclass(frozen=True)
class MaskConfig:
    """Foreground detection at low resolution.

    ``brightfield``: background is bright and unsaturated (smears, tissue). ``nodata``: pixels equal
    to ``nodata_value`` in every channel are background (field images). ``none``: everything is
    foreground. Patches whose foreground fraction is below ``min_foreground_frac`` are not scored.

    ``roi``: a region of interest for every sample without its own (a manifest line's ``roi=``):
    a GeoJSON of polygons (level-0 pixels, QuPath's export; or map coordinates of a GeoTIFF) or a
    mask image (PNG / TIFF / OME-Zarr labels, nonzero = inside). ``roi_mode``: ``intersect`` (the
    automatic mask inside the ROI) or ``replace`` (the ROI is the mask). A patch is scored only when
    at least ``min_inside_frac`` of it lies inside. ``roi_include`` / ``roi_exclude``: GeoJSON
    classification names to keep / to cut out (empty include = every feature not excluded).
    ``roi_crs``: ``auto`` (a GeoJSON ``crs`` member means map coordinates), ``pixels`` or ``map``
    (see slidescore.core.roi).
    """

    method: str = "brightfield"
    min_foreground_frac: float = 0.1
    mask_mpp: float = 4.0
    min_saturation: float = 0.08
    max_brightness: float = 0.85
    nodata_value: float = 0.0
    roi: str | None = None
    roi_mode: str = "intersect"
    roi_include: tuple[str, ...] = ()
    roi_exclude: tuple[str, ...] = ()
    roi_crs: str = "auto"
    min_inside_frac: float = 0.5

    def validate(self, prefix: str) -> None:
        _one_of(self.method, ("brightfield", "nodata", "none"), f"{prefix}.method")
        for key in ("min_foreground_frac", "min_saturation", "max_brightness"):
            _number(getattr(self, key), f"{prefix}.{key}", "a fraction in [0, 1]", lambda v: 0 <= v <= 1)
        _number(self.mask_mpp, f"{prefix}.mask_mpp", "a finite positive number (µm/px)", lambda v: v > 0)
        # a NaN pixel never equals NaN, so a NaN nodata value would silently mark everything foreground
        _number(self.nodata_value, f"{prefix}.nodata_value", "a finite pixel value")
        if self.roi is not None and (not isinstance(self.roi, str) or not self.roi.strip()):
            raise ConfigError(f"{prefix}.roi: expected a path or s3:// URI of a GeoJSON or mask image, or null, got {self.roi!r}")
        _one_of(self.roi_mode, ("intersect", "replace"), f"{prefix}.roi_mode")
        _one_of(self.roi_crs, ("auto", "pixels", "map"), f"{prefix}.roi_crs")
        _number(self.min_inside_frac, f"{prefix}.min_inside_frac", "a fraction in [0, 1]", lambda v: 0 <= v <= 1)
        for key in ("roi_include", "roi_exclude"):
            names = getattr(self, key)
            if not all(isinstance(n, str) and n.strip() for n in names):
                raise ConfigError(f"{prefix}.{key}: expected a list of classification names, got {list(names)!r}")
        both = sorted(set(self.roi_include) & set(self.roi_exclude))
        if both:
            raise ConfigError(f"{prefix}.roi_include / roi_exclude: {both[0]!r} is in both; name each class in one list")


@dataclass(frozen=True)
class RegionsConfig:
    """Suspect regions: threshold the map, label components, rank.

    ``thresholds`` overrides the model card's per-class thresholds (one value per class).
    """

    thresholds: tuple[float, ...] | None = None
    min_area_um2: float = 0.0
    top_k: int = 100
    connectivity: int = 2

    def validate(self, prefix: str) -> None:
        if self.thresholds is not None:
            for t in self.thresholds:
                _number(t, f"{prefix}.thresholds", "probabilities in [0, 1]", lambda v: 0 <= v <= 1)
        _number(self.min_area_um2, f"{prefix}.min_area_um2", "a finite number >= 0 (µm²)", lambda v: v >= 0)
        _positive_int(self.top_k, f"{prefix}.top_k")
        _one_of(self.connectivity, (1, 2), f"{prefix}.connectivity")


@dataclass(frozen=True)
class DicomInputConfig:
    """Which plane of a DICOM WSI series with several is scored (``input.dicom``).

    ``optical_path``: the OpticalPathIdentifier to read (a string, e.g. ``"1"``; null: the first by
    sorted identifier); ``focal_plane``: the focal plane to read, in µm (null: the one nearest 0 µm,
    the nominal focus). A series without the one asked for fails its sample with the ones it has.
    Ignored for images that are not DICOM.
    """

    optical_path: str | None = None
    focal_plane: float | None = None

    def validate(self, prefix: str) -> None:
        if self.optical_path is not None and (not isinstance(self.optical_path, str) or not self.optical_path.strip()):
            raise ConfigError(f"{prefix}.optical_path: expected an optical path identifier (a string such as '1'; quote "
                              f"numbers) or null (the first), got {self.optical_path!r}")
        if self.focal_plane is not None:
            _number(self.focal_plane, f"{prefix}.focal_plane", "a focal plane in µm (a finite number) or null (nearest 0 µm)")

    def is_default(self) -> bool:
        return self.optical_path is None and self.focal_plane is None


@dataclass(frozen=True)
class InputConfig:
    """How images are read.

    ``mpp`` overrides (or supplies missing) level-0 resolution metadata, in µm/px (a GeoTIFF's
    0.5 m/px is 500000). A pyramid level within ``mpp_tolerance`` (a fraction) of the model's µm/px
    is scored as is; otherwise the nearest finer level is resampled to it. ``conversion`` overrides
    the model card's ``input_conversion`` key by key: ``{"uint16": {"low": 0, "high": 4095}}``
    maps a pixel type linearly from [low, high] onto 0…255 and clips (keys: a dtype name such as
    ``uint16``/``int16``/``float32``, or ``float`` for any float type), and ``gray_to_rgb: true``
    lets an RGB model score a single-channel image by replicating it.
    ``backend`` picks the reader: ``auto`` (by file signature and name: OpenSlide for MIRAX, NDPI,
    VMS, SCN, BIF, Philips…; DICOM for DICOM WSI; tifffile / zarr otherwise), ``tifffile`` (tifffile
    and zarr, streaming), ``openslide`` or ``dicom``; a manifest line's ``backend=`` overrides it
    per sample. A remote slide read through OpenSlide is fetched whole into ``cache_dir`` (default:
    a folder under the system temp dir), an LRU cache per node of at most ``cache_max_bytes``.
    ``dicom`` (:class:`DicomInputConfig`): the optical path and focal plane of a DICOM series.
    """

    mpp: float | None = None
    mpp_tolerance: float = 0.1
    conversion: dict[str, Any] | None = None
    backend: str = "auto"
    cache_dir: str | None = None
    cache_max_bytes: int = 64 * 2**30
    dicom: DicomInputConfig = field(default_factory=DicomInputConfig)

    def validate(self, prefix: str) -> None:
        self.dicom.validate(f"{prefix}.dicom")
        if self.mpp is not None:
            _number(self.mpp, f"{prefix}.mpp", "a positive µm/px (at most 1e8) or null", lambda v: 0 < v <= 1e8)
        _number(self.mpp_tolerance, f"{prefix}.mpp_tolerance", "a fraction in [0, 1)", lambda v: 0 <= v < 1)
        if self.conversion is not None:
            check_conversion(self.conversion, f"{prefix}.conversion")
        _one_of(self.backend, ("auto", "tifffile", "openslide", "dicom"), f"{prefix}.backend")
        if self.cache_dir is not None and (not isinstance(self.cache_dir, str) or not self.cache_dir.strip()
                                           or "://" in self.cache_dir):
            raise ConfigError(f"{prefix}.cache_dir: expected a local folder for the slide cache (or null: under the "
                              f"system temp dir), got {self.cache_dir!r}")
        _positive_int(self.cache_max_bytes, f"{prefix}.cache_max_bytes")


CONVERSION_DTYPES = ("uint16", "uint32", "int8", "int16", "int32", "float", "float16", "float32", "float64")


def check_conversion(rules: Any, where: str) -> None:
    """Validate an input-conversion mapping (config ``input.conversion`` or a card's ``input_conversion``)."""
    if not isinstance(rules, dict):
        raise ConfigError(f"{where}: expected a mapping such as {{uint16: {{low: 0, high: 4095}}}}, got {rules!r}")
    for key, rule in rules.items():
        if key == "gray_to_rgb":
            if not isinstance(rule, bool):
                raise ConfigError(f"{where}.gray_to_rgb: expected true or false, got {rule!r}")
            continue
        if key not in CONVERSION_DTYPES:
            raise ConfigError(f"{where}.{key}: unknown key; expected a pixel type {list(CONVERSION_DTYPES)} or gray_to_rgb")
        ok = isinstance(rule, dict) and set(rule) == {"low", "high"} and all(
            isinstance(rule[k], int | float) and not isinstance(rule[k], bool)
            and not (isinstance(rule[k], float) and not math.isfinite(rule[k])) for k in ("low", "high"))
        if not ok or not rule["low"] < rule["high"]:
            raise ConfigError(f"{where}.{key}: expected {{low: <number>, high: <number>}} (finite) with low < high "
                              f"(the input range mapped onto 0…255), got {rule!r}")


@dataclass(frozen=True)
class OutputConfig:
    """Where and how results are written.

    ``dtype`` of the probability mosaic: ``float32`` stores p; ``uint8`` stores ``1 + round(p · 254)``
    (1…255) and 0 for a cell not scored, so "not scored" sorts below every probability.
    ``not_scored`` (float32 only): what a cell no patch scored holds, and the arrays' fill value:
    ``nan`` (default), or a finite number outside [0, 1] such as ``-1`` for viewers that cannot handle
    NaN (the ``omero`` window stays 0–1, so -1 falls below it: dark or transparent). slidescore's own
    readers return NaN for it either way.
    """

    uri: str = "slidescore-output"
    dtype: str = "float32"
    overwrite: bool = False
    not_scored: Any = "nan"  # "nan" or a finite number outside [0, 1] (a float32 mosaic's no-data value)

    def __post_init__(self) -> None:
        v = self.not_scored
        if (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and v.strip().lower() in ("nan", ".nan")):
            object.__setattr__(self, "not_scored", "nan")  # YAML .nan, NaN and nan alike (NaN != NaN would break equality)

    def validate(self, prefix: str) -> None:
        _one_of(self.dtype, ("float32", "uint8"), f"{prefix}.dtype")
        if self.not_scored != "nan":
            _number(self.not_scored, f"{prefix}.not_scored", "nan or a finite number outside [0, 1] (e.g. -1)",
                    lambda v: not 0 <= v <= 1)
            if self.dtype != "float32":
                raise ConfigError(f"{prefix}.not_scored: applies to float32 mosaics only; a {self.dtype} mosaic stores "
                                  f"0 for a cell not scored (set output.dtype: float32, or remove not_scored)")

    def not_scored_value(self) -> float | None:
        """The no-data value a float32 mosaic stores (``None``: NaN)."""
        return None if self.not_scored == "nan" else float(self.not_scored)


@dataclass(frozen=True)
class DecisionConfig:
    """How probabilities become decisions (issue #7).

    ``operating_point`` names one of the model card's ``operating_points`` (``None``: the card's
    ``thresholds``). ``target_prevalence`` (one value per class, or one for all) corrects the
    model's logits from its training prevalence to the target data's by the difference of their
    log-odds. ``sample_call`` turns region/patch counts into a positive/negative/needs-review call:
    positive when at least ``min_positive_units`` units are positive and false positives alone
    would give that many with probability <= ``call_alpha`` (see ``slidescore.decide.sample_call``).
    """

    operating_point: str | None = None
    target_prevalence: tuple[float, ...] | None = None
    sample_call: bool = True
    call_alpha: float = 0.05
    min_positive_units: int = 1

    def validate(self, prefix: str) -> None:
        if self.operating_point is not None and not self.operating_point.strip():
            raise ConfigError(f"{prefix}.operating_point: expected the name of an operating point in the model card, got {self.operating_point!r}")
        for p in self.target_prevalence or ():
            _number(p, f"{prefix}.target_prevalence", "fractions in (0, 1)", lambda v: 0 < v < 1)
        _number(self.call_alpha, f"{prefix}.call_alpha", "a probability in (0, 1)", lambda v: 0 < v < 1)
        _positive_int(self.min_positive_units, f"{prefix}.min_positive_units")


@dataclass(frozen=True)
class ReportConfig:
    """The per-sample report for the specialist (issue #8).

    ``top_k`` regions get level-0 crops (``crop_px`` to ``max_crop_px`` level-0 pixels a side) and,
    with ``gradcam``, explanation maps (integrated gradients; the key keeps its historical name), for as
    long as ``explain_budget_s`` seconds per image lasts. The overview is at most ``overview_px`` on its long side.
    Data-quality checks run at the coarsest level at or finer than ``quality_mpp`` µm/px. The QuPath
    tile heat map has at most ``qupath_max_tiles`` tiles.
    """

    enabled: bool = True
    top_k: int = 12
    gradcam: bool = True
    overview_px: int = 1024
    crop_px: int = 192
    max_crop_px: int = 512
    quality_mpp: float = 1.0
    qupath_max_tiles: int = 20000
    explain_budget_s: float = 120.0

    def validate(self, prefix: str) -> None:
        for key in ("top_k", "overview_px", "crop_px", "max_crop_px", "qupath_max_tiles"):
            _positive_int(getattr(self, key), f"{prefix}.{key}")
        _number(self.explain_budget_s, f"{prefix}.explain_budget_s", "a finite number of seconds >= 0", lambda v: v >= 0)
        if self.max_crop_px < self.crop_px:
            raise ConfigError(f"{prefix}.max_crop_px: expected >= crop_px={self.crop_px}, got {self.max_crop_px!r}")
        _number(self.quality_mpp, f"{prefix}.quality_mpp", "a finite positive µm/px", lambda v: v > 0)


@dataclass(frozen=True)
class ClusterConfig:
    """How ``jobs/score.py`` runs on Ray: a fixed pool of scoring actors.

    ``address`` is passed to ``ray.init`` (``None``: the job's cluster, ``RAY_ADDRESS``, or a new
    local instance). Each of the ``n_actors`` actors reserves ``num_cpus_per_actor`` CPUs and
    ``num_gpus_per_actor`` GPUs (fractional values share a GPU; 0 on CPU-only clusters) and gets
    at most ``max_in_flight_per_actor`` tasks at a time. A task whose actor died or that hit a
    transient storage error is retried up to ``max_retries`` times. The run fails with a clear
    error when no actor has started after ``actor_start_timeout_s`` seconds. ``keep_warm_s`` > 0
    keeps the actors (and their resources) after the job, for the next job of the same code,
    runtime environment and resources to take over, until idle that long (0: off; see
    ``slidescore.run.ray.pool``).
    """

    address: str | None = None
    n_actors: int = 1
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    max_in_flight_per_actor: int = 2
    max_retries: int = 3
    actor_start_timeout_s: float = 600.0
    keep_warm_s: float = 0.0

    def validate(self, prefix: str) -> None:
        if self.address is not None and not self.address.strip():
            raise ConfigError(f"{prefix}.address: expected null (auto) or a Ray address such as 'auto' or 'ray://head:10001', got {self.address!r}")
        _positive_int(self.n_actors, f"{prefix}.n_actors")
        _positive_int(self.max_in_flight_per_actor, f"{prefix}.max_in_flight_per_actor")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ConfigError(f"{prefix}.max_retries: expected an integer >= 0, got {self.max_retries!r}")
        _number(self.num_cpus_per_actor, f"{prefix}.num_cpus_per_actor", "a finite number >= 0", lambda v: v >= 0)
        g = self.num_gpus_per_actor
        _number(g, f"{prefix}.num_gpus_per_actor", "0, a fraction of one GPU (0 < g <= 1) or a whole number",
                lambda v: v >= 0 and (v <= 1 or v == int(v)))
        if self.num_cpus_per_actor == 0 and g == 0:
            raise ConfigError(f"{prefix}.num_cpus_per_actor: an actor must reserve some CPU or GPU; got 0 CPUs and 0 GPUs")
        _number(self.actor_start_timeout_s, f"{prefix}.actor_start_timeout_s", "a finite positive number of seconds",
                lambda v: v > 0)
        _number(self.keep_warm_s, f"{prefix}.keep_warm_s", "a finite number of seconds >= 0 (0: no warm pool)",
                lambda v: v >= 0)


@dataclass(frozen=True)
class LimitsConfig:
    """Bounds on the work one image may cause; an image beyond one fails alone, naming the key.

    A header of a few bytes can declare a 2,000,000² px image or a 60,000² px tile, and a wrong
    resolution can ask for a million-fold upsampling: such samples are refused while planning,
    before any pixel is read, instead of running for hours or exhausting memory. The defaults pass
    every real slide we know of (a 100k² px whole slide, pyramidal or not); raise a limit when an
    image really is larger. ``max_pixels``: pixels of any pyramid level and of the level scored
    (5e10 ≈ 224k² px). ``max_tile_bytes``: one decoded tile, strip or chunk (checked from the
    header when the file is opened). ``max_blocks``: planned blocks of one image.
    ``max_upsample`` / ``max_downsample``: the resampling to the model's µm/px when no pyramid
    level is close enough (virtual pixels per source pixel, and source pixels per virtual pixel,
    along an axis). ``max_mask_pixels``: pixels read to compute the foreground mask (the
    whole level nearest ``mask.mask_mpp``).
    """

    max_pixels: float = 5e10
    max_tile_bytes: int = 256 * 2**20
    max_blocks: int = 1_000_000
    max_upsample: float = 8.0
    max_downsample: float = 64.0
    max_mask_pixels: float = 2e10

    def validate(self, prefix: str) -> None:
        for key in ("max_pixels", "max_mask_pixels"):
            _number(getattr(self, key), f"{prefix}.{key}", "a positive number of pixels (e.g. 5.0e+10)", lambda v: v > 0)
        _positive_int(self.max_tile_bytes, f"{prefix}.max_tile_bytes")
        _positive_int(self.max_blocks, f"{prefix}.max_blocks")
        for key in ("max_upsample", "max_downsample"):
            _number(getattr(self, key), f"{prefix}.{key}", "a finite factor >= 1 (1: no resampling that way)",
                    lambda v: v >= 1)


def _number(value: Any, key: str, expected: str, ok: Callable[[Any], bool] = lambda v: True) -> None:
    """Raise unless ``value`` is a finite real number (not a bool) for which ``ok`` holds.

    Every float setting goes through here, so NaN (which fails no comparison) and ±inf never pass
    a range check by accident.
    """
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or (isinstance(value, float) and not math.isfinite(value)) or not ok(value)):
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def _positive_int(value: Any, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key}: expected a positive integer, got {value!r}")


def _one_of(value: Any, allowed: tuple[Any, ...], key: str, prefix_ok: str | None = None) -> None:
    if value in allowed or (prefix_ok and isinstance(value, str) and value.startswith(prefix_ok)):
        return
    raise ConfigError(f"{key}: expected one of {list(allowed)}, got {value!r}")
