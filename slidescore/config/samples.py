"""Samples of a job: :class:`SampleSpec` (an id and its images), sample-id checks, the ``samples``
section (:class:`SamplesConfig`: URIs, a manifest, groups, a prefix) and :func:`parse_manifest`, the
one manifest parser shared by the job's ``samples.manifest`` and the intake poller's ``manifest``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from slidescore.errors import ConfigError

SAMPLE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class SampleSpec:
    """One sample: its id and its images (one, or several fields of one smear).

    ``sample_id`` ``None`` means "derive it from the image's file name" (plain one-image entries).
    A sample of several images is scored image by image and its regions are ranked together.
    ``origin`` says where the sample was found (a manifest line, an intake folder), for messages
    only: it is not compared, hashed or shown in ``repr``. ``roi``: the sample's region of interest
    (a GeoJSON or mask image URI; one-image samples only), else the config's ``mask.roi``.
    """

    sample_id: str | None
    uris: tuple[str, ...]
    roi: str | None = None
    backend: str = "auto"  # the reader of its images (input.backend's values); "auto": the config's input.backend
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


def _roi_word(words: list[str], at: str) -> str | None:
    """Take a ``roi=PATH`` word out of a manifest line's words (in place); ``None`` when there is none."""
    found = [w for w in words if w.startswith("roi=")]
    if len(found) > 1 or (found and not found[0][4:]):
        raise ConfigError(f"{at}: expected at most one 'roi=PATH' (a GeoJSON or mask image), got {found}")
    for w in found:
        words.remove(w)
    if found and not words:
        raise ConfigError(f"{at}: {found[0]!r} names no image; expected 'URI roi=PATH' or 'ID: URI roi=PATH'")
    return found[0][4:] if found else None


READER_BACKENDS = ("auto", "tifffile", "openslide", "dicom")


def _backend_word(words: list[str], at: str) -> str:
    """Take a ``backend=NAME`` word out of a manifest line's words (in place); ``"auto"`` when there is none."""
    found = [w for w in words if w.startswith("backend=")]
    if len(found) > 1 or (found and found[0][8:] not in READER_BACKENDS):
        raise ConfigError(f"{at}: expected at most one 'backend=NAME' with NAME one of {list(READER_BACKENDS)}, got {found}")
    for w in found:
        words.remove(w)
    if found and not words:
        raise ConfigError(f"{at}: {found[0]!r} names no image; expected 'URI backend=NAME' or 'ID: URI … backend=NAME'")
    return found[0][8:] if found else "auto"


def parse_manifest(text: str, where: str) -> list[str | SampleSpec]:
    """The entries of a sample manifest: the one parser of the job's ``samples.manifest`` and the
    intake poller's ``manifest``, so both see the same samples.

    Parameters
    ----------
    text
        The manifest's text. One entry per line, words separated by whitespace (URIs cannot
        contain whitespace):

        - ``URI``: one image, a sample of its own whose id is derived from the file name;
        - ``ID: URI [URI …]``: a sample with that id made of those images (fields of one smear);
        - a word ``roi=PATH`` after the URI of a one-image sample (``URI roi=PATH`` or
          ``ID: URI roi=PATH``): the sample's region of interest (GeoJSON or mask image);
        - a word ``backend=NAME`` (``auto``, ``tifffile``, ``openslide``, ``dicom``) anywhere after
          the first: the reader of the sample's images, instead of the config's ``input.backend``.

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
        roi = _roi_word(words, at)
        backend = _backend_word(words, at)
        if words[0].endswith(":") and "://" not in words[0]:
            sid, uris = words[0][:-1], tuple(words[1:])
            check_sample_id(sid, at)
            if not uris:
                raise ConfigError(f"{at}: sample {sid!r} lists no image; expected 'ID: URI [URI …]'")
            twice = sorted(u for u, k in Counter(uris).items() if k > 1)
            if twice:
                raise ConfigError(f"{at}: sample {sid!r} lists an image twice ({twice[0]}); list each image once")
            if roi is not None and len(uris) > 1:
                raise ConfigError(f"{at}: roi= applies to one image; sample {sid!r} has {len(uris)} — "
                                  "give each image its own line (and id) with its own roi=")
            out.append(SampleSpec(sid, uris, roi=roi, backend=backend, origin=at))
        elif len(words) == 1 and (roi is not None or backend != "auto"):
            out.append(SampleSpec(None, (words[0],), roi=roi, backend=backend, origin=at))
        elif len(words) == 1:
            out.append(words[0])
        else:
            raise ConfigError(
                f"{at}: expected one URI per line, or 'ID: URI URI …' for a sample of several images "
                f"(URIs cannot contain spaces; a comment starts with ' #'), got {line.strip()!r}"
            )
    return out
