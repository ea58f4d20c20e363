"""Bounded work for hostile headers: the ``limits`` checks of a planned image, before any pixel is read.

A file's header says how large the image is, and planning trusts it: the mask is read over the whole
canvas, the patch grid and the blocks cover it, a virtual level is resampled to the model's µm/px.
A few bytes can claim 2,000,000² px, or a resolution that needs a 2,000,000× upsampling; such a
sample would plan for hours and keep the samples after it waiting. :func:`check_planned_image`
refuses it while planning, from the header alone, with an :class:`UnsupportedImageError` that
names the sample, the value found, the limit and the config key that raises it
(:class:`~slidescore.config.LimitsConfig`).

The one check that must happen before the reader allocates, the size of one decoded tile or chunk
(a 431-byte file can declare one 60,000² tile), is the reader's own, when the file is opened
(:func:`slidescore.io.base.check_chunk_bytes`, default :data:`slidescore.io.base.MAX_TILE_BYTES`);
:func:`reader_options` gives ``open_image`` the config's value, and :func:`check_planned_image`
checks a reader opened without it against the config too.
"""

from __future__ import annotations

from typing import Any

from slidescore.config import JobConfig
from slidescore.core.tiling import PatchGrid, ceil_div
from slidescore.core.types import LevelInfo
from slidescore.errors import UnsupportedImageError
from slidescore.io.adapt import InputRecipe
from slidescore.io.base import SlideReader


def keyed_config(cfg: JobConfig, backend: str) -> JobConfig:
    """The config a sample's run key covers: a sample's own reader (a manifest's ``backend=``) as ``input.backend``
    (different decoders may give different pixels, so a resumed run never mixes them)."""
    return cfg if backend == "auto" else cfg.replace(input={"backend": backend})


def reader_options(cfg: JobConfig, backend: str = "auto") -> dict[str, Any]:
    """Keyword arguments of ``open_image`` that carry the config's limits, reader backend (a sample's
    own ``backend`` unless ``auto``), slide cache and, when set, DICOM plane (``input.dicom``) to the reader."""
    inp = cfg.input
    options = {"max_tile_bytes": cfg.limits.max_tile_bytes, "backend": inp.backend if backend == "auto" else backend,
               "cache_dir": inp.cache_dir, "cache_max_bytes": inp.cache_max_bytes}
    if not inp.dicom.is_default():  # left out otherwise: a plan's open_options stay as before input.dicom
        from slidescore.io.dicom import DicomOptions

        options["dicom"] = DicomOptions(inp.dicom.optical_path, inp.dicom.focal_plane)
    return options


def drop_default_reader(input_section: dict[str, Any]) -> None:
    """Take ``backend`` and ``dicom`` out of a config's ``input`` section (``to_dict()``, in place)
    when they are the defaults, so run keys of runs from before these settings do not change."""
    if input_section.get("backend") == "auto":
        input_section.pop("backend")
    if input_section.get("dicom") == {"optical_path": None, "focal_plane": None}:
        input_section.pop("dicom")


def dicom_record(open_options: dict[str, Any]) -> dict[str, Any] | None:
    """run.json's ``input.dicom`` of an image: the plane asked for (``input.dicom``), ``None`` when default."""
    opts = open_options.get("dicom")
    if opts is None:
        return None
    return {"optical_path": opts.optical_path, "focal_plane": opts.focal_plane}


def mask_level(levels: tuple[LevelInfo, ...], mpp0: float, mask_mpp: float) -> int:
    """The level the foreground mask is read from: the coarsest at or finer than ``mask_mpp``
    (1 % slack), else the finest (as ``compute_cell_foreground`` reads it)."""
    mpps = [mpp0 * lv.downsample for lv in levels]
    candidates = [i for i, m in enumerate(mpps) if m <= mask_mpp * 1.01]
    return max(candidates, key=lambda i: mpps[i]) if candidates else min(range(len(mpps)), key=lambda i: mpps[i])


def check_planned_image(reader: SlideReader, cfg: JobConfig, sample_id: str, *, mpp0: float,
                        recipe: InputRecipe | None, level: int, grid: PatchGrid) -> None:
    """Refuse an image whose planned work is beyond ``cfg.limits`` (nothing is read).

    ``reader`` is the reader the plan reads through (an ``AdaptedReader`` when ``recipe`` added a
    virtual level), ``level`` the level scored and ``grid`` its patch grid. Checked in this order:
    pixels of every level of the file (``limits.max_pixels``), one decoded tile
    (``limits.max_tile_bytes``), the resampling factor (``limits.max_upsample`` /
    ``limits.max_downsample``), pixels of the level scored (``limits.max_pixels``), planned blocks
    (``limits.max_blocks``) and pixels read for the mask (``limits.max_mask_pixels``).
    """
    lim = cfg.limits
    uri = reader.uri
    who = f"sample {sample_id!r} ({uri})"
    inner: Any = getattr(reader, "inner", reader)  # the file's own reader under an AdaptedReader

    def refuse(what: str, key: str, value: float, limit: float, fix: str = "") -> UnsupportedImageError:
        fix = fix or f"raise {key} in the config if this image is real"
        return UnsupportedImageError(f"{who}: {what}, above {key} = {_num(limit)}; {fix}",
                                     uri=uri, key=key, value=value, limit=limit)

    for lv in inner.levels:
        n = lv.height * lv.width
        if n > lim.max_pixels:
            raise refuse(f"level {lv.index} is {lv.height:,} × {lv.width:,} px ({_sci(n)} px)", "limits.max_pixels", n,
                         lim.max_pixels)
    chunk = getattr(inner, "max_chunk_bytes", None)
    if isinstance(chunk, int) and chunk > lim.max_tile_bytes:
        raise refuse(f"one decoded tile / chunk is {chunk:,} bytes", "limits.max_tile_bytes", chunk,
                     lim.max_tile_bytes, "re-export the image with smaller tiles (e.g. 512 × 512 px), or raise "
                     "limits.max_tile_bytes in the config if this image is real")
    if recipe is not None and recipe.resample_from_level is not None:
        f = recipe.resample_factor  # source pixels per virtual pixel
        src_mpp = mpp0 * inner.levels[recipe.resample_from_level].downsample
        to = f"to the model's {_sci(src_mpp * f, 3)} µm/px"
        fix = ("check the image's resolution metadata (input.mpp overrides it), export a pyramid level near the "
               "model's µm/px, or raise {} in the config if this is intended")
        if f < 1 and 1 / f > lim.max_upsample:
            raise refuse(f"scoring needs level {recipe.resample_from_level} ({_sci(src_mpp, 3)} µm/px) upsampled "
                         f"{_num(1 / f)}× {to}", "limits.max_upsample", 1 / f, lim.max_upsample,
                         fix.format("limits.max_upsample"))
        if f > lim.max_downsample:
            raise refuse(f"scoring needs level {recipe.resample_from_level} ({_sci(src_mpp, 3)} µm/px) downsampled "
                         f"{_num(f)}× {to}", "limits.max_downsample", f, lim.max_downsample,
                         fix.format("limits.max_downsample"))
    info = reader.levels[level]
    n = info.height * info.width
    if n > lim.max_pixels:  # a resampled virtual level (the file's levels passed above)
        raise refuse(f"the level scored (level {level}, at the model's µm/px) is {info.height:,} × {info.width:,} px "
                     f"({_sci(n)} px)", "limits.max_pixels", n, lim.max_pixels)
    edge = cfg.tiling.chunk_cells * cfg.tiling.block_chunks
    cy, cx = grid.cells_shape
    n_blocks = ceil_div(cy, edge) * ceil_div(cx, edge)
    if n_blocks > lim.max_blocks:
        raise refuse(f"{n_blocks:,} blocks of {edge} × {edge} cells would be planned ({info.height:,} × {info.width:,} px "
                     f"at level {level})", "limits.max_blocks", n_blocks, lim.max_blocks,
                     "raise tiling.chunk_cells or tiling.block_chunks, or raise limits.max_blocks in the config if this "
                     "image is real")
    if cfg.mask.method != "none":
        m = mask_level(reader.levels, mpp0, cfg.mask.mask_mpp)
        mlv = reader.levels[m]
        n = mlv.height * mlv.width
        if n > lim.max_mask_pixels:
            raise refuse(f"the foreground mask would read level {m} ({_sci(mpp0 * mlv.downsample, 3)} µm/px, the level nearest "
                         f"mask.mask_mpp = {cfg.mask.mask_mpp:g} µm/px), {mlv.height:,} × {mlv.width:,} px ({_sci(n)} px)",
                         "limits.max_mask_pixels", n, lim.max_mask_pixels,
                         "export a pyramid (a level near mask.mask_mpp), raise mask.mask_mpp, set mask.method: none, or "
                         "raise limits.max_mask_pixels in the config if this image is real")


def _num(x: float) -> str:
    """A limit or value for a message: ``5e10``, ``2e6``, ``268,435,456``, ``8``, ``1.5``."""
    if x >= 1e9 or (x >= 1e6 and not float(x).is_integer()):
        mant, exp = f"{x:.3g}".split("e")
        return f"{mant}e{int(exp)}"
    if float(x).is_integer():
        return f"{int(x):,}"
    return f"{x:.3g}"


def _sci(x: float, digits: int = 2) -> str:
    """A count or a µm/px for a message: ``4.0e12``, ``250,000``, ``1e6``, ``0.5``, ``2.5e-5``."""
    if digits == 2:  # a pixel count
        return f"{int(x):,}" if x < 1e6 else _short_exp(f"{x:.1e}")
    return _short_exp(f"{x:.{digits}g}")


def _short_exp(text: str) -> str:
    if "e" not in text:
        return text
    mant, exp = text.split("e")
    return f"{mant}e{int(exp)}"
