"""A sample's ``run.json`` as types: :class:`SampleRecord` and its parts (input, grid, counts, decision, report, …).

``run.json`` is :meth:`SampleRecord.to_dict`: the finishing stage builds the record
(:mod:`slidescore.stages.finish`), the lifecycle adds ``quality``, ``report`` and the report's
``outputs`` as attributes (:func:`slidescore.run.lifecycle.finish_sample`), and the report reads
it by attribute; :meth:`SampleRecord.from_dict` turns a run.json back into the record (entries an
older run.json lacks take their defaults). Entries that only some records carry (``images`` of a
sample of several images, ``sample_call`` when the call is off, ``quality`` and ``report`` when the
report is off, …) are left out of the JSON, not written as ``null``. Sub-records stay
``dict[str, Any]`` only where their content is owned and typed elsewhere or open by design; each
says so where it is declared. :mod:`slidescore.stages.records` re-exports every type here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar, Self


def _omit_none(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    """``d`` without those of ``keys`` whose value is ``None`` (entries only some records carry)."""
    for k in keys:
        if d[k] is None:
            del d[k]
    return d


def _known(cls: type, d: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``d`` that are fields of the flat record ``cls`` (run.json may be older or newer than this code)."""
    names = cls.__dataclass_fields__  # type: ignore[attr-defined]
    return {k: v for k, v in d.items() if k in names}


def _obj(v: Any) -> dict[str, Any]:
    """A JSON object being read; ``{}`` for a missing or ``null`` entry."""
    return v if isinstance(v, dict) else {}


class _Flat:
    """A record of plain values: :meth:`to_dict` in field order, leaving out the ``_OPTIONAL`` entries that are ``None``."""

    _OPTIONAL: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        return _omit_none(asdict(self), *self._OPTIONAL)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        return cls(**_known(cls, d))


@dataclass
class InputRecord(_Flat):
    """``input`` of one image: its fingerprint, its resolution, the level scored and how its pixels were adapted."""

    uri: str = ""
    size_bytes: int = 0
    etag: str | None = None  # object stores (left out when absent)
    mtime: float | None = None  # files, and stores without an ETag (left out when absent)
    mpp0: float | None = None  # µm/px of level 0 (None: not recorded)
    mpp_source: str = ""
    level: int = 0
    level_mpp: float | None = None
    level_shape: list[int] = field(default_factory=list)
    # slidescore.io.adapt.InputRecipe.to_dict(): typed there, recorded as io writes it; None: read as it is
    conversion: dict[str, Any] | None = None
    resampled_from_level: int | None = None
    resample_scale: float = 1.0
    # GeoTIFF inputs: the reader's georeference (EPSG, affine, units) as slidescore.io.tiff gives it
    georeference: dict[str, Any] | None = None
    # the region of interest scored (slidescore.core.roi.apply_roi: uri, kind, sha256, mode, min_inside_frac,
    # inside_area_um2, rasterised, …); left out without one
    roi: dict[str, Any] | None = None
    # the reader backend asked for (input.backend / a manifest's backend=; left out when auto) and, for a
    # remote slide OpenSlide read, its fetch into the node's cache (slidescore.io.remote_cache: bytes, seconds, hit)
    backend: str | None = None
    fetch: dict[str, Any] | None = None
    # the DICOM plane asked for (input.dicom: optical_path, focal_plane; left out at the defaults)
    dicom: dict[str, Any] | None = None

    _OPTIONAL = ("etag", "mtime", "roi", "backend", "fetch", "dicom")


@dataclass
class SampleInput(_Flat):
    """``input`` of a sample of several images: their URIs (each image's own ``input`` is in ``images``)."""

    images: list[str] = field(default_factory=list)
    n_images: int = 0


@dataclass
class GridRecord(_Flat):
    """``grid``: the patch grid of invariant 1 (the shapes per image; a sample of several leaves them out)."""

    patch_px: int = 0
    stride_px: int = 0
    cells_shape: list[int] | None = None
    patches_shape: list[int] | None = None
    border_policy: str = ""

    _OPTIONAL = ("cells_shape", "patches_shape")


@dataclass
class PatchCounts(_Flat):
    """``patches``: how many patches the grid has, were scored, skipped as background, and evaluated with the halo."""

    total: int = 0
    scored: int = 0
    skipped_background: int = 0
    evaluated_with_halo: int = 0

    @staticmethod
    def summed(parts: list[PatchCounts]) -> PatchCounts:
        return PatchCounts(sum(p.total for p in parts), sum(p.scored for p in parts),
                           sum(p.skipped_background for p in parts), sum(p.evaluated_with_halo for p in parts))


@dataclass
class BlockCounts(_Flat):
    """``blocks``: how many blocks, how many a resumed run reused, how many held no foreground."""

    total: int = 0
    resumed: int = 0
    without_foreground: int = 0

    @staticmethod
    def summed(parts: list[BlockCounts]) -> BlockCounts:
        return BlockCounts(sum(p.total for p in parts), sum(p.resumed for p in parts),
                           sum(p.without_foreground for p in parts))


@dataclass
class AreaRecord(_Flat):
    """``area``: cells scored and the fraction not scored (background); ``cell_um`` per image only."""

    scored_cells: int = 0
    cell_um: float | None = None
    discarded_fraction: float = float("nan")  # nan: not recorded

    _OPTIONAL = ("cell_um",)


@dataclass
class Timings(_Flat):
    """``timings_s``: seconds per stage; an image's own stages, then (sample level) pyramid, regions and total."""

    open_s: float = 0.0
    mask_s: float = 0.0
    read_s: float = 0.0
    score_s: float = 0.0
    write_s: float = 0.0
    pyramid_s: float | None = None  # the sample level only (left out of an image's record)
    regions_s: float | None = None
    total_s: float | None = None

    _OPTIONAL = ("pyramid_s", "regions_s", "total_s")

    @staticmethod
    def summed(parts: list[Timings]) -> Timings:
        """The images' own stages summed (their sample adds pyramid, regions and total)."""
        return Timings(sum(t.open_s for t in parts), sum(t.mask_s for t in parts), sum(t.read_s for t in parts),
                       sum(t.score_s for t in parts), sum(t.write_s for t in parts))


@dataclass
class Throughput(_Flat):
    """``throughput``: patches per second in the model and level-0 megapixels per second end to end."""

    patches_per_s: float | None = None
    megapixels_per_s: float | None = None


@dataclass
class RegionCounts(_Flat):
    """``regions``: regions found above threshold, and how many the region files list (``regions.top_k``)."""

    total: int = 0
    written: int = 0


@dataclass
class ModelRecord(_Flat):
    """``model``: where the classifier came from, its checksum, card and device (see :func:`model_info`)."""

    source: str = ""
    sha256: str = ""
    # ModelCard.to_dict(): typed in slidescore.model.card (ModelCard.from_dict reads it back)
    card: dict[str, Any] = field(default_factory=dict)
    device: str = ""
    # the classifier's scoring_info() (dense self-check, device options): the model layer's, open by design
    scoring: dict[str, Any] | None = None

    _OPTIONAL = ("scoring",)


@dataclass
class CalibrationRecord(_Flat):
    method: str = "none"  # none | temperature | isotonic
    temperature: float | None = None


@dataclass
class SampleCall(_Flat):
    """``decision.sample_call``: the sample-level call (positive, negative, needs_review) and each class's."""

    call: str = ""
    operating_point: str | None = None
    # per class, slidescore.decide's figures behind its call (call_sample): their keys depend on whether
    # the card has validation figures for the class, so they stay the decide layer's open mapping
    per_class: dict[str, dict[str, Any]] = field(default_factory=dict)


_DECISION_KEYS = ("operating_point", "operating_point_unit", "thresholds", "calibration", "training_prevalence",
                  "target_prevalence", "prior_shift", "unit_figures", "sample_call")


@dataclass
class DecisionRecord:
    """``decision``: the decision policy (slidescore.decide.DecisionPolicy.record) and the sample-level call.

    ``None`` entries were not recorded (a hand-made or older record; one that records none of the
    policy's entries writes none of them); ``extra`` keeps the entries of such a record that this
    layout does not know (its own ``call``, figures, …), for the report.
    """

    operating_point: str | None = None
    operating_point_unit: str | None = None
    thresholds: dict[str, float] | None = None
    calibration: CalibrationRecord | None = None
    training_prevalence: dict[str, float] | None = None
    target_prevalence: dict[str, float] | None = None
    prior_shift: bool | None = None
    # per class: the card's validation figures at the operating point (sensitivity, specificity, …), the card's layout
    unit_figures: dict[str, dict[str, float]] | None = None
    sample_call: SampleCall | None = None  # left out when decision.sample_call is off
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "operating_point": self.operating_point, "operating_point_unit": self.operating_point_unit,
            "thresholds": self.thresholds, "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "training_prevalence": self.training_prevalence, "target_prevalence": self.target_prevalence,
            "prior_shift": self.prior_shift, "unit_figures": self.unit_figures,
        }
        if all(v is None for v in d.values()):  # not the policy's record: only what it has
            d = {}
        if self.sample_call is not None:
            d["sample_call"] = self.sample_call.to_dict()
        return {**d, **self.extra}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DecisionRecord:
        cal, call = d.get("calibration"), d.get("sample_call")
        return cls(operating_point=d.get("operating_point"), operating_point_unit=d.get("operating_point_unit"),
                   thresholds=d.get("thresholds"), calibration=CalibrationRecord.from_dict(cal) if isinstance(cal, dict) else None,
                   training_prevalence=d.get("training_prevalence"), target_prevalence=d.get("target_prevalence"),
                   prior_shift=d.get("prior_shift"), unit_figures=d.get("unit_figures"),
                   sample_call=SampleCall.from_dict(call) if isinstance(call, dict) else None,
                   extra={k: v for k, v in d.items() if k not in _DECISION_KEYS})


@dataclass
class ImageRecord:
    """What run.json records of one image; a sample of several lists one per image under ``images``.

    A one-image sample's record carries its image's entries at the top level (:class:`SampleRecord`).
    """

    image_id: str | None = None  # a sample of several images only (left out otherwise)
    folder: str | None = None
    input: InputRecord = field(default_factory=InputRecord)
    grid: GridRecord = field(default_factory=GridRecord)
    patches: PatchCounts = field(default_factory=PatchCounts)
    blocks: BlockCounts = field(default_factory=BlockCounts)
    area: AreaRecord = field(default_factory=AreaRecord)
    timings_s: Timings = field(default_factory=Timings)

    def to_dict(self) -> dict[str, Any]:
        return _omit_none({"image_id": self.image_id, "folder": self.folder, "input": self.input.to_dict(),
                           "grid": self.grid.to_dict(), "patches": self.patches.to_dict(), "blocks": self.blocks.to_dict(),
                           "area": self.area.to_dict(), "timings_s": self.timings_s.to_dict()}, "image_id", "folder")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImageRecord:
        return cls(image_id=d.get("image_id"), folder=d.get("folder"), input=InputRecord.from_dict(_obj(d.get("input"))),
                   grid=GridRecord.from_dict(_obj(d.get("grid"))), patches=PatchCounts.from_dict(_obj(d.get("patches"))),
                   blocks=BlockCounts.from_dict(_obj(d.get("blocks"))), area=AreaRecord.from_dict(_obj(d.get("area"))),
                   timings_s=Timings.from_dict(_obj(d.get("timings_s"))))


@dataclass
class QualityFlag(_Flat):
    """One data-quality check (slidescore.report.quality): every check is recorded, raised or not."""

    flag: str = ""
    value: float | str | None = None
    threshold: float | str | None = None
    raised: bool = False
    message: str = ""
    image: str | None = None  # the image's id, in a sample of several images (left out otherwise)

    _OPTIONAL = ("image",)


@dataclass
class RegionCrop(_Flat):
    """A region shown on a report page: its level-0 crop box and, with Grad-CAM, where the map peaks in it."""

    rank: int = 0
    crop_box_px: list[int] = field(default_factory=list)  # y, x, h, w
    gradcam_peak_px: list[int] | None = None  # y, x in the crop (left out without Grad-CAM)

    _OPTIONAL = ("gradcam_peak_px",)


@dataclass
class ImageReport:
    """``report`` of a one-image sample, or one entry of ``report.images`` of a sample of several."""

    html: str = ""
    tiles_geojson: str = ""
    top_k: int = 0
    top_peak_probability: float | None = None
    call: str = ""
    gradcam: str = ""
    gradcam_model: str = ""  # passed in | loaded again | none
    regions: list[RegionCrop] = field(default_factory=list)
    seconds: float = 0.0
    image_id: str | None = None  # a sample of several images only (left out otherwise)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["regions"] = [r.to_dict() for r in self.regions]
        return _omit_none(d, "image_id")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImageReport:
        return cls(**{**_known(cls, d), "regions": [RegionCrop.from_dict(r) for r in d.get("regions") or []]})


@dataclass
class SampleReport:
    """``report`` of a sample of several images: its own page, and each image's (``images``)."""

    html: str = ""
    top_k: int = 0
    top_peak_probability: float | None = None
    call: str = ""
    image_pages: list[str] = field(default_factory=list)
    regions_without_crops: list[int] = field(default_factory=list)
    seconds: float = 0.0
    images: list[ImageReport] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["images"] = [r.to_dict() for r in self.images]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SampleReport:
        return cls(**{**_known(cls, d), "images": [ImageReport.from_dict(r) for r in d.get("images") or []]})


@dataclass
class PerImageOutputs(_Flat):
    """``outputs.per_image`` of a sample of several images: the files in each ``images/<image_id>/`` folder."""

    folder: str = ""
    mosaic: str = ""
    mask: str = ""
    labels: str = ""
    regions: str = ""
    overview: str = ""
    report: str | None = None  # with the report (left out otherwise)
    tiles: str | None = None

    _OPTIONAL = ("report", "tiles")


@dataclass
class OutputsRecord:
    """``outputs``: the sample's files, relative to its folder (a sample of several images: ``per_image``)."""

    mosaic: str | None = None  # one-image samples (left out of a sample of several images)
    mask: str | None = None
    labels: str | None = None
    regions: list[str] = field(default_factory=list)
    overview: str | None = None
    per_image: PerImageOutputs | None = None  # a sample of several images only
    report: str | None = None  # with the report (left out otherwise)
    tiles: str | None = None  # a one-image sample's tile heat map (with the report)

    def add_report(self, html: str, tiles: str) -> None:
        """Name the report's files: the sample's page; each image's tile map (and page, for several images)."""
        self.report = html
        if self.per_image is not None:
            self.per_image.report, self.per_image.tiles = html, tiles
        else:
            self.tiles = tiles

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["per_image"] = None if self.per_image is None else self.per_image.to_dict()
        return _omit_none(d, "mosaic", "mask", "labels", "overview", "per_image", "report", "tiles")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OutputsRecord:
        per = d.get("per_image")
        return cls(**{**_known(cls, d), "per_image": PerImageOutputs.from_dict(per) if isinstance(per, dict) else None})


@dataclass
class SampleRecord:
    """A sample's ``run.json``: input, level, model, config, counts, decision, regions, timings, quality, report.

    One layout for samples of one image and of several: a one-image sample carries its image's
    ``input``, ``grid``, ``patches``, ``blocks``, ``area`` and ``timings_s`` itself; a sample of
    several lists them per image in ``images`` (:class:`ImageRecord`) and carries their totals
    (``input`` then names the images, :class:`SampleInput`). :meth:`for_image` is the record as one
    image's report page sees it. ``decision`` and ``regions`` are ``null`` until the finishing
    stage sets them; ``quality`` and ``report`` are left out when the report is off.
    """

    sample_id: str = ""
    run_key: str = ""
    slidescore_version: str = ""
    code_version: str = ""
    input: InputRecord | SampleInput = field(default_factory=InputRecord)
    model: ModelRecord = field(default_factory=ModelRecord)
    # JobConfig.to_dict(): the resolved config, typed in slidescore.config (JobConfig.from_dict reads it back)
    config: dict[str, Any] = field(default_factory=dict)
    images: list[ImageRecord] | None = None  # a sample of several images only
    grid: GridRecord = field(default_factory=GridRecord)
    patches: PatchCounts = field(default_factory=PatchCounts)
    blocks: BlockCounts = field(default_factory=BlockCounts)
    area: AreaRecord = field(default_factory=AreaRecord)
    thresholds: dict[str, float] = field(default_factory=dict)  # class → threshold of the mosaic's labels
    decision: DecisionRecord | None = None
    regions: RegionCounts | None = None
    timings_s: Timings = field(default_factory=Timings)
    throughput: Throughput = field(default_factory=Throughput)
    outputs: OutputsRecord = field(default_factory=OutputsRecord)
    quality: list[QualityFlag] | None = None
    report: ImageReport | SampleReport | None = None

    @property
    def image_input(self) -> InputRecord:
        """``input`` of a one-image record (or of one image's view, :meth:`for_image`)."""
        if isinstance(self.input, InputRecord):
            return self.input
        raise ValueError(f"sample {self.sample_id!r} has {self.input.n_images} images; take one with for_image(i)")

    def for_image(self, i: int) -> SampleRecord:
        """The record as the report of image ``i`` sees it: the sample's, with that image's own entries."""
        if self.images is None:
            if i != 0:
                raise IndexError(f"sample {self.sample_id!r} has one image; no image {i}")
            return self
        img = self.images[i]
        return replace(self, sample_id=f"{self.sample_id}/{img.image_id}", input=img.input, grid=img.grid,
                       patches=img.patches, blocks=img.blocks, area=img.area, timings_s=img.timings_s)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "sample_id": self.sample_id, "run_key": self.run_key, "slidescore_version": self.slidescore_version,
            "code_version": self.code_version, "input": self.input.to_dict(), "model": self.model.to_dict(),
            "config": self.config,
        }
        if self.images is not None:
            d["images"] = [img.to_dict() for img in self.images]
        d.update({
            "grid": self.grid.to_dict(), "patches": self.patches.to_dict(), "blocks": self.blocks.to_dict(),
            "area": self.area.to_dict(), "thresholds": self.thresholds,
            "decision": None if self.decision is None else self.decision.to_dict(),
            "regions": None if self.regions is None else self.regions.to_dict(),
            "timings_s": self.timings_s.to_dict(), "throughput": self.throughput.to_dict(), "outputs": self.outputs.to_dict(),
        })
        if self.quality is not None:
            d["quality"] = [q.to_dict() for q in self.quality]
        if self.report is not None:
            d["report"] = self.report.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SampleRecord:
        """The record of a run.json; entries an older run.json lacks take their defaults (``None``: not recorded)."""
        inp, dec, reg, rep = _obj(d.get("input")), d.get("decision"), d.get("regions"), d.get("report")
        images, quality = d.get("images"), d.get("quality")
        report: ImageReport | SampleReport | None = None
        if isinstance(rep, dict):
            report = SampleReport.from_dict(rep) if "images" in rep or "image_pages" in rep else ImageReport.from_dict(rep)
        return cls(
            sample_id=d.get("sample_id", ""), run_key=d.get("run_key", ""),
            slidescore_version=d.get("slidescore_version", ""), code_version=d.get("code_version", ""),
            input=SampleInput.from_dict(inp) if "images" in inp else InputRecord.from_dict(inp),
            model=ModelRecord.from_dict(_obj(d.get("model"))), config=_obj(d.get("config")),
            images=[ImageRecord.from_dict(x) for x in images] if isinstance(images, list) else None,
            grid=GridRecord.from_dict(_obj(d.get("grid"))), patches=PatchCounts.from_dict(_obj(d.get("patches"))),
            blocks=BlockCounts.from_dict(_obj(d.get("blocks"))), area=AreaRecord.from_dict(_obj(d.get("area"))),
            thresholds=_obj(d.get("thresholds")),
            decision=DecisionRecord.from_dict(dec) if isinstance(dec, dict) and dec else None,
            regions=RegionCounts.from_dict(reg) if isinstance(reg, dict) else None,
            timings_s=Timings.from_dict(_obj(d.get("timings_s"))), throughput=Throughput.from_dict(_obj(d.get("throughput"))),
            outputs=OutputsRecord.from_dict(_obj(d.get("outputs"))),
            quality=[QualityFlag.from_dict(q) for q in quality] if isinstance(quality, list) else None,
            report=report,
        )

    @classmethod
    def of(cls, run: SampleRecord | Mapping[str, Any]) -> SampleRecord:
        """``run`` as a record: itself, or a run.json's dict read with :meth:`from_dict` (for callers with a dict)."""
        return run if isinstance(run, SampleRecord) else cls.from_dict(run)
