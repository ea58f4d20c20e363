"""Where every output of a run lies: folder and file names, sample and image ids, markers.

One place for the layout (docs/architecture.md, "Output layout"), so the planner, the block
writers, the finishing step, the runners, intake and the report agree on every path. A sample id
becomes a folder name under the output root: ids derived from file names obey the same rule as
explicit ids (:data:`~slidescore.config.SAMPLE_ID_PATTERN`: a letter or digit first, then letters,
digits, ``.``, ``_``, ``-``) and never take a name the run itself writes at the root
(:data:`RESERVED`); :func:`sample_dir` refuses any path that would leave the output root.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from slidescore.config import SAMPLE_ID_PATTERN, SampleSpec
from slidescore.errors import ConfigError
from slidescore.io.outputs import join

MOSAIC = "probabilities.ome.zarr"
MASK = "mask.ome.zarr"
SUCCESS = "_SUCCESS"
RUN_JSON = "run.json"
FAILURES = "failures.jsonl"
INDEX = "index.html"
IMAGES = "images"  # <sample>/images/<image_id>/ for samples of several images
BLOCKS = ".blocks"  # <image folder>/.blocks/<run key>/<block key>.json: one completion record per block
RUN_KEY_FILE = ".run_key"
# names the run writes at the output root: a sample folder must never take one
RESERVED = frozenset({RUN_JSON, FAILURES, INDEX, SUCCESS, BLOCKS, RUN_KEY_FILE, IMAGES})
_IMAGE_EXT = re.compile(r"(\.ome)?\.(tiff?|svs|ndpi|zarr|btf|tf8)$", re.IGNORECASE)


def sample_id_for(uri: str) -> str:
    """A safe sample id from an image URI: the file name without image extensions.

    Characters outside letters, digits, ``.``, ``_``, ``-`` become ``_``; a leading ``.`` or ``-``
    (``..tif``, ``-rf.tif``) and a name the run writes at the output root (``run.json.tif``) get a
    ``sample_`` prefix, so the id always matches :data:`~slidescore.config.SAMPLE_ID_PATTERN`.
    """
    name = uri.rstrip("/").split("/")[-1]
    name = _IMAGE_EXT.sub("", name)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    if not name or not SAMPLE_ID_PATTERN.match(name) or name in RESERVED:
        name = "sample_" + name.lstrip(".-") if name.strip(".-_") else "sample"
    return name


def check_folder_name(name: str, what: str) -> None:
    """Refuse a sample or image id that is not a safe folder name (explicit ids are checked by the config)."""
    if not SAMPLE_ID_PATTERN.match(name) or name in RESERVED:
        raise ConfigError(f"{what}: {name!r} cannot name an output folder; use letters, digits, '.', '_' or '-', "
                          f"starting with a letter or digit, and none of {sorted(RESERVED)}")


def _unique_names(uris: Sequence[str], taken: set[str]) -> list[str]:
    """``sample_id_for`` of each URI, made unique with ``-2``, ``-3`` … (and distinct from ``taken``)."""
    seen: dict[str, int] = {}
    out = []
    for u in uris:
        base = sample_id_for(u)
        n = seen.get(base, 0)
        while True:
            name = base if n == 0 else f"{base}-{n + 1}"
            n += 1
            if name not in taken:
                break
        seen[base] = n
        taken.add(name)
        out.append(name)
    return out


def image_ids(uris: Sequence[str]) -> list[str]:
    """Folder names of the images of a sample (``images/<image_id>/``): file names, made unique."""
    return _unique_names(uris, set())


def sample_label(spec: SampleSpec) -> str:
    """The ``uri`` recorded for a sample: its image URI, or its URIs separated by spaces."""
    return " ".join(spec.uris)


def sample_dir(out_root: str, sample_id: str) -> str:
    """``<out_root>/<sample_id>``, after checking the id names one folder directly under the root."""
    check_folder_name(sample_id, "sample id")
    return join(out_root, sample_id)


def image_dir(out_root: str, sample_id: str, image_id: str = "") -> str:
    """The folder of one image's mosaic: the sample folder, or ``images/<image_id>`` of a sample of several."""
    if not image_id:
        return sample_dir(out_root, sample_id)
    check_folder_name(image_id, f"sample {sample_id!r}: image id")
    return join(sample_dir(out_root, sample_id), IMAGES, image_id)


def blocks_dir(image_folder: str, run_key: str) -> str:
    """Where the block completion records of one image and run lie."""
    return join(image_folder, BLOCKS, run_key)


def block_marker(image_folder: str, run_key: str, block_key: str) -> str:
    """The completion record of one block (written after its chunks)."""
    return join(blocks_dir(image_folder, run_key), f"{block_key}.json")
