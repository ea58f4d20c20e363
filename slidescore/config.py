"""Run configuration: one YAML file → frozen dataclasses, validated before any work starts.

``load_config(path)`` reads the YAML with :func:`load_yaml_file`, the one strict, bounded YAML
reader of the project (duplicate keys, alias bombs, oversize files and several documents are
refused), and builds a :class:`JobConfig`. Unknown keys and bad values (NaN and infinities
included) raise :class:`~slidescore.errors.ConfigError` naming the dotted key, what was expected
and what was found. Configs are plain data (they pickle), hold no secrets (endpoints and
credentials come from the environment) and round-trip through ``to_dict``. Sample manifests,
the job's and the intake poller's, are read by one parser, :func:`parse_manifest`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slidescore.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    """Which model to run and how.

    ``name`` is ``builtin:<name>``, a model package folder (``card.json`` + ``weights.pt``), or a
    TorchScript file with a ``card.json``/``.card.json`` beside it. ``mode``: ``auto`` scores densely
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
        """Keyword arguments of ``load_model`` beyond the name: device and the CUDA options."""
        return {"device": self.device, "amp": self.amp, "channels_last": self.channels_last, "compile": self.compile,
                "dense_tile_px": self.dense_tile_px}


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
    """

    method: str = "brightfield"
    min_foreground_frac: float = 0.1
    mask_mpp: float = 4.0
    min_saturation: float = 0.08
    max_brightness: float = 0.85
    nodata_value: float = 0.0

    def validate(self, prefix: str) -> None:
        _one_of(self.method, ("brightfield", "nodata", "none"), f"{prefix}.method")
        for key in ("min_foreground_frac", "min_saturation", "max_brightness"):
            _number(getattr(self, key), f"{prefix}.{key}", "a fraction in [0, 1]", lambda v: 0 <= v <= 1)
        _number(self.mask_mpp, f"{prefix}.mask_mpp", "a finite positive number (µm/px)", lambda v: v > 0)
        # a NaN pixel never equals NaN, so a NaN nodata value would silently mark everything foreground
        _number(self.nodata_value, f"{prefix}.nodata_value", "a finite pixel value")


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
class InputConfig:
    """How images are read.

    ``mpp`` overrides (or supplies missing) level-0 resolution metadata, in µm/px (a GeoTIFF's
    0.5 m/px is 500000). A pyramid level within ``mpp_tolerance`` (a fraction) of the model's µm/px
    is scored as is; otherwise the nearest finer level is resampled to it. ``conversion`` overrides
    the model card's ``input_conversion`` key by key: ``{"uint16": {"low": 0, "high": 4095}}``
    maps a pixel type linearly from [low, high] onto 0…255 and clips (keys: a dtype name such as
    ``uint16``/``int16``/``float32``, or ``float`` for any float type), and ``gray_to_rgb: true``
    lets an RGB model score a single-channel image by replicating it.
    """

    mpp: float | None = None
    mpp_tolerance: float = 0.1
    conversion: dict[str, Any] | None = None

    def validate(self, prefix: str) -> None:
        if self.mpp is not None:
            _number(self.mpp, f"{prefix}.mpp", "a positive µm/px (at most 1e8) or null", lambda v: 0 < v <= 1e8)
        _number(self.mpp_tolerance, f"{prefix}.mpp_tolerance", "a fraction in [0, 1)", lambda v: 0 <= v < 1)
        if self.conversion is not None:
            check_conversion(self.conversion, f"{prefix}.conversion")


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
    """Where and how results are written."""

    uri: str = "slidescore-output"
    dtype: str = "float32"
    overwrite: bool = False

    def validate(self, prefix: str) -> None:
        _one_of(self.dtype, ("float32", "uint8"), f"{prefix}.dtype")


SAMPLE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class SampleSpec:
    """One sample: its id and its images (one, or several fields of one smear).

    ``sample_id`` ``None`` means "derive it from the image's file name" (plain one-image entries).
    A sample of several images is scored image by image and its regions are ranked together.
    ``origin`` says where the sample was found (a manifest line, an intake folder), for messages
    only: it is not compared, hashed or shown in ``repr``.
    """

    sample_id: str | None
    uris: tuple[str, ...]
    origin: str = field(default="", compare=False, repr=False)


def check_sample_id(sample_id: str, key: str) -> None:
    """Sample ids become folder names: letters, digits, ``.``, ``_``, ``-``; not starting with a dot."""
    if not isinstance(sample_id, str) or not SAMPLE_ID_PATTERN.match(sample_id):
        raise ConfigError(
            f"{key}: expected a sample id of letters, digits, '.', '_' or '-' (it names the output folder), got {sample_id!r}"
        )


@dataclass(frozen=True)
class SamplesConfig:
    """Which images a job scores (used by ``jobs/score.py``; the CLI takes images as arguments).

    ``uris`` lists images directly, one sample each; ``manifest`` names a UTF-8 text file with one
    sample per line in the format of :func:`parse_manifest` (a relative manifest path is resolved
    against the working directory): one image URI (the sample id is the file name), or
    ``ID: URI [URI …]``, a sample with that id made of those images (fields of one smear; one image
    with an explicit id is fine too); blank lines, comment lines and `` # `` trailing comments
    are ignored.
    ``groups`` maps sample ids to lists of image URIs in the config itself::

        groups:
          smear-17: [s3://slides/smear17/field1.tif, s3://slides/smear17/field2.tif]

    ``prefix`` is a folder or object-store prefix (``s3://bucket/incoming/``) whose images are all
    scored, one sample each: files with an image extension and ``*.zarr`` folders directly under it,
    sorted. All may be given: the listed URIs come first, then the manifest's, then the groups, then
    the prefix's. Explicit sample ids must be unique.
    """

    uris: tuple[str, ...] = ()
    manifest: str | None = None
    prefix: str | None = None
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        # YAML gives lists; keep tuples inside (validate() reports anything that is not a mapping of lists)
        if isinstance(self.groups, dict) and all(isinstance(v, list | tuple) for v in self.groups.values()):
            object.__setattr__(self, "groups", {k: tuple(v) for k, v in self.groups.items()})

    def validate(self, prefix: str) -> None:
        for u in self.uris:
            if not u.strip():
                raise ConfigError(f"{prefix}.uris: expected non-empty image URIs, got {u!r}")
        if self.manifest is not None and not self.manifest.strip():
            raise ConfigError(f"{prefix}.manifest: expected a path to a text file with one sample per line, got {self.manifest!r}")
        if self.prefix is not None and not self.prefix.strip():
            raise ConfigError(f"{prefix}.prefix: expected a folder or s3:// prefix holding images, got {self.prefix!r}")
        if not isinstance(self.groups, dict):
            raise ConfigError(f"{prefix}.groups: expected a mapping of sample id → list of image URIs, got {self.groups!r}")
        for sid, uris in self.groups.items():
            check_sample_id(sid, f"{prefix}.groups")
            if not isinstance(uris, tuple) or not uris or not all(isinstance(u, str) and u.strip() and " " not in u for u in uris):
                raise ConfigError(
                    f"{prefix}.groups.{sid}: expected a non-empty list of image URIs (without spaces), got {uris!r}"
                )
            if len(set(uris)) != len(uris):
                raise ConfigError(f"{prefix}.groups.{sid}: an image is listed twice in {list(uris)}; list each image once")

    def list_samples(self) -> list[str | SampleSpec]:
        """The samples to score, in order (``uris``, the manifest's lines, ``groups``; not ``prefix``).

        Plain one-image entries are URI strings (the id comes from the file name, made unique);
        entries with an id are :class:`SampleSpec` s.
        """
        out: list[str | SampleSpec] = list(self.uris)
        if self.manifest is not None:
            out += _read_manifest(Path(self.manifest))
        out += [SampleSpec(sid, uris) for sid, uris in self.groups.items()]
        seen: set[str] = set()
        for e in out:
            if isinstance(e, SampleSpec) and e.sample_id is not None:
                if e.sample_id in seen:
                    raise ConfigError(f"samples: sample id {e.sample_id!r} is given twice (manifest / groups); ids must be unique")
                seen.add(e.sample_id)
        return out

    def list_uris(self) -> list[str]:
        """The one-image samples as URIs (``uris`` then the manifest's lines).

        Raises ``ConfigError`` when some sample has an explicit id or several images: read those
        with :meth:`list_samples`.
        """
        entries = self.list_samples()
        named = [e for e in entries if not isinstance(e, str)]
        if named:
            raise ConfigError(
                f"samples: {len(named)} sample(s) with an id or several images (e.g. {named[0].sample_id!r}); "
                "this runner takes one image per sample — use SamplesConfig.list_samples()"
            )
        return [e for e in entries if isinstance(e, str)]


def _read_manifest(p: Path) -> list[str | SampleSpec]:
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"samples.manifest: cannot read {str(p)!r} ({type(e).__name__}: {e}); expected a UTF-8 text "
            "file with one image URI (or 'ID: URI URI …') per line"
        ) from None
    return parse_manifest(text, f"samples.manifest: {str(p)!r}")


def parse_manifest(text: str, where: str) -> list[str | SampleSpec]:
    """The entries of a sample manifest: the one parser of the job's ``samples.manifest`` and the
    intake poller's ``manifest``, so both see the same samples.

    Parameters
    ----------
    text
        The manifest's text. One entry per line, words separated by whitespace (URIs cannot
        contain whitespace):

        - ``URI``: one image, a sample of its own whose id is derived from the file name;
        - ``ID: URI [URI …]``: a sample with that id made of those images (fields of one smear).

        Comments: a line whose first non-blank character is ``#`` is a comment, and a ``#`` that
        follows whitespace starts a trailing comment (``a.tif  # scanner 2``). A ``#`` inside a
        word is part of it: ``s3://b/a#2.svs`` is one URI. Blank lines and a leading byte-order
        mark are ignored.
    where
        What the text is, starting every message and each sample's ``origin``, e.g.
        ``samples.manifest: 'samples.txt'``.

    Returns
    -------
    list of str or SampleSpec
        In line order: a URI string for a plain line, a :class:`SampleSpec` (with its ``origin``,
        ``<where> line <n>``) for an ``ID:`` line.

    Raises
    ------
    ConfigError
        A line with several words and no ``ID:``, an invalid sample id, an ``ID:`` without images or
        with one image twice; the message names the line.
    """
    out: list[str | SampleSpec] = []
    for n, line in enumerate(text.removeprefix("\ufeff").splitlines(), 1):
        words = line.split()
        for i, w in enumerate(words):
            if w.startswith("#"):  # a whole-line comment, or one after whitespace
                words = words[:i]
                break
        if not words:
            continue
        at = f"{where} line {n}"
        if words[0].endswith(":") and "://" not in words[0]:
            sid, uris = words[0][:-1], tuple(words[1:])
            check_sample_id(sid, at)
            if not uris:
                raise ConfigError(f"{at}: sample {sid!r} lists no image; expected 'ID: URI [URI …]'")
            twice = sorted(u for u, k in Counter(uris).items() if k > 1)
            if twice:
                raise ConfigError(f"{at}: sample {sid!r} lists an image twice ({twice[0]}); list each image once")
            out.append(SampleSpec(sid, uris, origin=at))
        elif len(words) == 1:
            out.append(words[0])
        else:
            raise ConfigError(
                f"{at}: expected one URI per line, or 'ID: URI URI …' for a sample of several images "
                f"(URIs cannot contain spaces; a comment starts with ' #'), got {line.strip()!r}"
            )
    return out


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
    with ``gradcam``, Grad-CAM maps. The overview is at most ``overview_px`` on its long side.
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

    def validate(self, prefix: str) -> None:
        for key in ("top_k", "overview_px", "crop_px", "max_crop_px", "qupath_max_tiles"):
            _positive_int(getattr(self, key), f"{prefix}.{key}")
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
    error when no actor has started after ``actor_start_timeout_s`` seconds.
    """

    address: str | None = None
    n_actors: int = 1
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    max_in_flight_per_actor: int = 2
    max_retries: int = 3
    actor_start_timeout_s: float = 600.0

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


@dataclass(frozen=True)
class JobConfig:
    """The whole run configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    blending: BlendingConfig = field(default_factory=BlendingConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    regions: RegionsConfig = field(default_factory=RegionsConfig)
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    decision: DecisionConfig = field(default_factory=DecisionConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def validate(self) -> JobConfig:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        return self

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> JobConfig:
        """Build and validate a config from plain data (``None``: all defaults)."""
        return _build(cls, {} if data is None else data, "").validate()

    def replace(self, **sections: dict[str, Any]) -> JobConfig:
        """A copy with some keys of some sections changed, e.g. ``replace(output={"uri": d})``."""
        d = self.to_dict()
        for section, values in sections.items():
            if section not in d:
                raise ConfigError(f"{section}: unknown section; known sections are {sorted(d)}")
            d[section].update(values)
        return JobConfig.from_dict(d)


def load_config(path: str | Path | None) -> JobConfig:
    """Read a YAML job config (``None`` → all defaults) with :func:`load_yaml_file`."""
    if path is None:
        return JobConfig().validate()
    p = Path(path)
    data = load_yaml_file(p, what="config file")
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r}: expected a mapping of sections at the top, got {type(data).__name__}")
    return JobConfig.from_dict(data)


# -- the one YAML reader ------------------------------------------------------------------------
# Limits far above any real config (a job or intake YAML is a few kB, uses a handful of anchors at
# most) and far below what could exhaust an unattended poller's memory or time.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_ALIASES = 100
MAX_YAML_NODES = 100_000  # nodes of the document with every alias expanded
MAX_YAML_DEPTH = 64  # nesting of collections, aliases expanded


class _BoundedLoader(yaml.SafeLoader):  # type: ignore[misc]
    """``SafeLoader`` that counts aliases and nesting while composing, before anything is built."""

    def __init__(self, text: str, where: str) -> None:
        super().__init__(text)
        self.where = where
        self.n_aliases = 0
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        # explicit tags (!!int x, !!binary, !custom) are never needed in a config, and PyYAML's
        # constructors for them let builtin errors through on malformed values
        if getattr(event, "tag", None) not in (None, "!"):
            raise ConfigError(f"{self.where}: explicit YAML tag {event.tag!r} at line {event.start_mark.line + 1}; a config "
                              "takes plain values: remove the tag (quote the value to make it a string)")
        if self.check_event(yaml.AliasEvent):
            self.n_aliases += 1
            if self.n_aliases > MAX_YAML_ALIASES:
                line = self.peek_event().start_mark.line + 1
                raise ConfigError(f"{self.where}: more than {MAX_YAML_ALIASES} aliases (*name), the last "
                                  f"at line {line}; a config needs few: write the values out")
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise ConfigError(f"{self.where}: nested more than {MAX_YAML_DEPTH} levels deep (line {line}); "
                                  "a config is a few levels of sections and lists")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def load_yaml_text(text: str, where: str) -> Any:
    """Parse one YAML document strictly and within bounds: the project's only YAML reader.

    Parameters
    ----------
    text
        The YAML text.
    where
        What it is, starting every message, e.g. ``config file 'job.yaml'``.

    Returns
    -------
    Any
        The document as plain data (``None`` for an empty document), as ``yaml.safe_load`` builds it.

    Raises
    ------
    ConfigError
        Text over :data:`MAX_YAML_BYTES` (checked before parsing); not valid YAML; more than one
        document; a mapping key given twice at any depth (the message names the key and both
        lines); more than :data:`MAX_YAML_ALIASES` aliases, or a document whose size with aliases
        expanded exceeds :data:`MAX_YAML_NODES` nodes or :data:`MAX_YAML_DEPTH` levels, or an
        alias inside its own anchor (all found on the composed node graph, before anything is
        expanded in memory).
    """
    n_bytes = len(text.encode("utf-8", "surrogatepass"))
    if n_bytes > MAX_YAML_BYTES:
        raise ConfigError(f"{where}: {n_bytes} bytes, over the limit of {MAX_YAML_BYTES} bytes (1 MiB) for a YAML "
                          "config; is it the right file?")
    try:
        loader = _BoundedLoader(text, where)  # the reader refuses control characters here already
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {e}") from None
    try:
        node = _single_node(loader, where)
        if node is None:
            return None
        _check_graph(node, loader, where)
        return loader.construct_document(node)
    except ConfigError:
        raise
    # PyYAML's constructors let builtin errors through for malformed values: the implicit date
    # 2026-13-01 or an int of 5000 digits (ValueError); and, were explicit tags not refused while
    # composing, `!!int x` (ValueError), `!!int ''` (IndexError), `!!bool x` (KeyError), `!!timestamp x`
    # (AttributeError)
    except (yaml.YAMLError, ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as e:
        detail = str(e) if isinstance(e, yaml.YAMLError) else f"{type(e).__name__}: {e}"
        raise ConfigError(f"{where} is not valid YAML: {detail}") from None
    finally:
        loader.dispose()


def load_yaml_file(path: str | Path, what: str = "config file") -> Any:
    """Read a YAML file with :func:`load_yaml_text`, refusing one over 1 MiB before reading it all.

    Parameters
    ----------
    path
        The file.
    what
        What it is, for messages (``config file``, ``intake config``).

    Returns
    -------
    Any
        The document as plain data (``None`` for an empty file).

    Raises
    ------
    ConfigError
        Missing, unreadable, not UTF-8, too large, or refused by :func:`load_yaml_text`.
    """
    p = Path(path)
    where = f"{what} {str(p)!r}"
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)  # never more, whatever the file is (a FIFO, /dev/zero)
    except FileNotFoundError:
        raise ConfigError(f"{where} not found; pass an existing YAML file to --config") from None
    except OSError as e:
        raise ConfigError(f"{where} cannot be read ({type(e).__name__}: {e}); pass a readable YAML file") from None
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(f"{where}: larger than the limit of {MAX_YAML_BYTES} bytes (1 MiB) for a YAML config; "
                          "is it the right file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where} is not UTF-8 text ({e}); save it as UTF-8") from None
    return load_yaml_text(text, where)


def _single_node(loader: Any, where: str) -> Any:
    """The composed node of the only document (``None`` if there is none); refuses a second one."""
    loader.get_event()  # StreamStartEvent
    node = loader.compose_document() if not loader.check_event(yaml.StreamEndEvent) else None
    if not loader.check_event(yaml.StreamEndEvent):
        line = loader.peek_event().start_mark.line + 1
        raise ConfigError(f"{where}: a second YAML document starts at line {line}; expected one document: remove "
                          "the '---' line and what follows, or merge the two")
    return node


def _check_graph(root: Any, loader: Any, where: str) -> None:
    """Refuse duplicate keys, recursive aliases and documents too large or deep once aliases are
    expanded, walking the composed graph once (each node's expanded size is memoised, so a
    billion-laughs document costs its written size, not its expanded one)."""
    size: dict[int, int] = {}
    height: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[Any, str, bool]] = [(root, "", False)]
    while stack:
        node, path, finished = stack.pop()
        nid = id(node)
        kids: list[tuple[Any, str]] = []
        if isinstance(node, yaml.MappingNode):
            kids = [(k, path) for k, _ in node.value]
            kids += [(v, _dotted(path, k)) for k, v in node.value]
        elif isinstance(node, yaml.SequenceNode):
            kids = [(v, f"{path}[{i}]") for i, v in enumerate(node.value)]
        if finished:
            open_.discard(nid)
            size[nid] = 1 + sum(size[id(k)] for k, _ in kids)
            height[nid] = 1 + max((height[id(k)] for k, _ in kids), default=0)
            if size[nid] > MAX_YAML_NODES:
                raise ConfigError(f"{where}: {_at(path)} expands to more than {MAX_YAML_NODES} values through its "
                                  "aliases (*name); refused (a config is small: write the values out)")
            if height[nid] > MAX_YAML_DEPTH:
                raise ConfigError(f"{where}: {_at(path)} is nested more than {MAX_YAML_DEPTH} levels deep once its "
                                  "aliases (*name) are expanded; refused")
            continue
        if nid in size:
            continue
        if nid in open_:
            raise ConfigError(f"{where}: {_at(path)} (line {node.start_mark.line + 1}) refers to itself through an "
                              "alias (*name) inside its own anchor; a config cannot be recursive")
        if isinstance(node, yaml.MappingNode):
            _check_keys(node, loader, where, path)
        open_.add(nid)
        stack.append((node, path, True))
        stack.extend((k, p, False) for k, p in reversed(kids))


def _check_keys(node: Any, loader: Any, where: str, path: str) -> None:
    lines: dict[Any, int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue  # a list or mapping as a key: the constructor refuses it (unhashable)
        # `<<` (merge) and `=` (value) keys have no scalar constructor: compare them as written
        special = key_node.tag in ("tag:yaml.org,2002:merge", "tag:yaml.org,2002:value")
        key = key_node.value if special else loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in lines:
            raise ConfigError(f"{where}: key {_dotted(path, key_node)!r} appears twice (lines {lines[key]} and "
                              f"{line}); keep one")
        lines[key] = line


def _dotted(path: str, key_node: Any) -> str:
    name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
    return f"{path}.{name}" if path else str(name)


def _at(path: str) -> str:
    return f"key {path!r}" if path else "the document"


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=repr)  # keys need not be strings (YAML `1: x`)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{key}: unknown key; {where} accepts {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(hints[name], value, key)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, key) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        number = float(value) if isinstance(value, float) or abs(value) < 2**1000 else math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r} (.nan and .inf are not settings; "
                              "remove the key for the default)")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_plain(v) for v in obj]
    return obj


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
