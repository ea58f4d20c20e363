"""A bounded on-disk cache, per node, of remote slides that only a file-reading library opens (OpenSlide).

tifffile and zarr stream tiles from object storage; OpenSlide opens local files only. A remote slide
read through OpenSlide is fetched whole, once per node, into ``cache_dir`` (config
``input.cache_dir``; default ``<system temp>/slidescore-slide-cache``), with every file it is made
of: a MIRAX ``.mrxs`` with its same-named folder (``Slidedat.ini``, ``Index.dat``, ``Data*.dat``), a
Hamamatsu ``.vms`` / ``.vmu`` with the image, map and optimisation files its index names. Parts are
fetched with ranged GETs in parallel, each retried (:func:`slidescore.io.storage.with_retries`).

Entries are keyed by the URI and the ETags (or sizes and mtimes) of all parts, so a re-uploaded
slide is fetched again. Several processes (Ray actors) of one node that want the same slide take
the entry's file lock: one fetches into a private temporary folder and renames it into place
(atomic), the others wait and then read it. A reader holds a shared lock on its entry while open.
The cache is bounded by ``input.cache_max_bytes``: before a fetch the least recently used entries
that no reader holds are deleted (when readers hold them all, the fetch goes ahead over the bound
rather than fail a sample; a slide larger than the bound alone is refused). Entries are **kept** after a sample succeeds (evicted by LRU,
not deleted on success), because every worker re-opens the slide for its blocks and a later
run may score it again; a fetch that fails leaves nothing behind. What a fetch cost (bytes,
seconds, files, whether it was a cache hit) is returned in :attr:`CachedSlide.stats` and recorded
in the image's ``run.json``.
"""

from __future__ import annotations

import configparser
import fcntl
import hashlib
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slidescore.errors import (
    InputError,
    SampleNotFoundError,
    SlideScoreError,
    UnsupportedImageError,
)
from slidescore.io import storage

DEFAULT_CACHE_DIR = os.path.join(tempfile.gettempdir(), "slidescore-slide-cache")
DEFAULT_CACHE_MAX_BYTES = 64 * 2**30
RANGE_BYTES = 16 * 2**20  # one ranged GET
FETCH_THREADS = 8
_STALE_TMP_S = 3600.0  # a temporary folder older than this is a crashed fetch's
_VMS_KEYS = ("imagefile", "mapfile", "optimisationfile", "macroimage")


@dataclass
class CachedSlide:
    """A remote slide's local copy: ``path`` of its main file, ``stats`` of the fetch, and ``pin``,
    the shared lock that keeps it from eviction (closed with the reader)."""

    path: str
    stats: dict[str, Any]
    pin: Any = field(default=None, repr=False)

    def close(self) -> None:
        pin, self.pin = self.pin, None
        if pin is not None:
            pin.close()  # releases the shared flock


@dataclass(frozen=True)
class _Part:
    uri: str
    rel: str  # path inside the entry
    size: int
    tag: str  # ETag, else mtime


def fetch_slide(uri: str, *, cache_dir: str | None = None, cache_max_bytes: int | None = None) -> CachedSlide:
    """The local copy of the remote slide ``uri`` (fetched unless cached), pinned until closed."""
    root = Path(cache_dir or DEFAULT_CACHE_DIR)
    limit = DEFAULT_CACHE_MAX_BYTES if cache_max_bytes is None else int(cache_max_bytes)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{uri}: cannot create the slide cache folder {root} ({e}); set input.cache_dir to a writable "
                         "local folder", uri=uri, key="input.cache_dir") from None
    parts = slide_parts(uri)
    total = sum(p.size for p in parts)
    if total > limit:
        raise InputError(f"{uri}: the slide is {total:,} bytes with its parts, above input.cache_max_bytes = {limit:,}; "
                         "raise input.cache_max_bytes (the node needs that much local disk), or convert the slide to "
                         "a tiled TIFF / OME-Zarr that streams from object storage", uri=uri, key="input.cache_max_bytes")
    key = hashlib.sha256("\n".join([uri, *(f"{p.rel}\t{p.size}\t{p.tag}" for p in parts)]).encode()).hexdigest()[:32]
    entry = root / key
    lock = open(root / f"{key}.lock", "a+b")  # noqa: SIM115 — held as the pin, closed by CachedSlide.close
    t0 = time.perf_counter()
    try:
        # readers hold the entry's lock shared (eviction needs it exclusive); a fetch holds it exclusive
        fcntl.flock(lock, fcntl.LOCK_SH)
        hit = entry.is_dir()
        if not hit:
            fcntl.flock(lock, fcntl.LOCK_UN)
            fcntl.flock(lock, fcntl.LOCK_EX)  # one fetcher per slide and node; the others wait here
            hit = entry.is_dir()  # fetched by another process while this one waited
            if not hit:
                _evict(root, limit - total, keep=key)
                try:
                    _download(uri, parts, root, entry)
                except SlideScoreError:
                    raise
                except OSError as e:  # the local disk: full, read-only, permissions
                    raise InputError(f"{uri}: cannot write the slide into the cache folder {root} ({e}); free space "
                                     "there or set input.cache_dir to a local folder with room for "
                                     f"{total:,} bytes", uri=uri, key="input.cache_dir") from None
            fcntl.flock(lock, fcntl.LOCK_SH)  # a reader now: eviction skips it until closed
        os.utime(entry)  # most recently used
    except BaseException:
        lock.close()
        raise
    stats = {"cache_hit": hit, "bytes": 0 if hit else total, "seconds": round(time.perf_counter() - t0, 4),
             "files": len(parts), "slide_bytes": total}
    return CachedSlide(str(entry / parts[0].rel), stats, lock)


def slide_parts(uri: str) -> list[_Part]:
    """Every remote object the slide ``uri`` is made of, its main file first."""
    fs, path = storage.filesystem(uri)
    proto = storage.protocol_of(uri)
    meta = storage.info(uri)
    if meta.get("type") == "directory":
        raise UnsupportedImageError(f"{uri}: is a prefix, not a slide file; OpenSlide reads a slide's main file "
                                    "(e.g. slide.mrxs, slide.vms)", uri=uri)
    name = path.rsplit("/", 1)[-1]
    parent = path[: -len(name)]
    parts = [_part(proto, path, name, meta)]
    lower = name.lower()
    if lower.endswith(".mrxs"):
        folder = parent + name[: -len(".mrxs")]
        found = storage.with_retries(lambda: fs.find(folder, detail=True), uri, "listing the MIRAX data folder")
        if not found:
            raise SampleNotFoundError(f"{uri}: the MIRAX data folder {proto}://{folder}/ (Slidedat.ini, Index.dat, "
                                      "Data*.dat) is missing; upload the .mrxs file with its same-named folder", uri=uri)
        parts += [_part(proto, p, p[len(parent):], m) for p, m in sorted(found.items()) if m.get("type") != "directory"]
    elif lower.endswith((".vms", ".vmu")):
        text = storage.with_retries(lambda: fs.cat_file(path), uri, "reading the VMS index")
        for ref in _vms_references(bytes(text), uri):
            ref_uri = f"{proto}://{parent}{ref}"
            try:
                m = storage.info(ref_uri)
            except SampleNotFoundError:
                raise SampleNotFoundError(f"{uri}: names {ref!r}, which is missing beside it ({ref_uri}); upload every "
                                          "file of the slide into one folder", uri=uri) from None
            parts.append(_part(proto, parent + ref, ref, m))
    return parts


def _part(proto: str, path: str, rel: str, meta: dict[str, Any]) -> _Part:
    tag = meta.get("ETag") or meta.get("etag") or meta.get("mtime") or meta.get("LastModified") or ""
    return _Part(f"{proto}://{path}", rel, int(meta.get("size") or 0), str(tag).strip('"'))


def _vms_references(text: bytes, uri: str) -> list[str]:
    """The files a Hamamatsu VMS/VMU index names (``ImageFile``, ``ImageFile(x,y)``, ``MapFile``,
    ``OptimisationFile``, ``MacroImage``), in the same folder."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read_string(text.decode("utf-8", errors="replace"))
    except configparser.Error as e:
        raise UnsupportedImageError(f"{uri}: not a readable VMS/VMU index ({e}); re-export the slide", uri=uri) from None
    refs: list[str] = []
    for section in parser.sections():
        for k, v in parser.items(section):
            v = v.strip()
            if k.split("(")[0].strip() in _VMS_KEYS and v:
                if "/" in v or "\\" in v or v in (".", ".."):
                    raise UnsupportedImageError(f"{uri}: the index names {v!r}, not a file beside it; re-export the slide",
                                                uri=uri)
                if v not in refs:
                    refs.append(v)
    if not refs:
        raise UnsupportedImageError(f"{uri}: the VMS/VMU index names no ImageFile; re-export the slide", uri=uri)
    return refs


def _download(uri: str, parts: list[_Part], root: Path, entry: Path) -> None:
    """Fetch every part into a private folder, then rename it to ``entry`` (atomic)."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{entry.name}.tmp-", dir=root))
    try:
        jobs: list[tuple[_Part, Path, int, int]] = []
        for p in parts:
            dest = tmp / p.rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "wb") as f:
                f.truncate(p.size)
            jobs += [(p, dest, start, min(p.size, start + RANGE_BYTES)) for start in range(0, p.size, RANGE_BYTES)]

        def get(job: tuple[_Part, Path, int, int]) -> int:
            p, dest, start, end = job
            fs, path = storage.filesystem(p.uri)
            data = storage.with_retries(lambda: fs.cat_file(path, start=start, end=end), p.uri, f"fetching bytes {start}-{end}")
            if len(data) != end - start:
                raise InputError(f"{p.uri}: got {len(data)} bytes for range {start}-{end}; the object changed while it "
                                 "was fetched — retry the sample", uri=p.uri)
            fd = os.open(dest, os.O_WRONLY)
            try:
                os.pwrite(fd, data, start)
            finally:
                os.close(fd)
            return len(data)

        with ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="slide-fetch") as pool:
            got = sum(pool.map(get, jobs))
        if got != sum(p.size for p in parts):
            raise InputError(f"{uri}: fetched {got:,} bytes, expected {sum(p.size for p in parts):,}; retry the sample", uri=uri)
        os.rename(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _entry_bytes(entry: Path) -> int:
    return sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())


def _evict(root: Path, budget: int, *, keep: str) -> None:
    """Delete least recently used entries no reader holds until the others fit in ``budget`` bytes."""
    with open(root / ".evict.lock", "a+b") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        now = time.time()
        entries = []
        for d in root.iterdir():
            if not d.is_dir():
                continue
            if ".tmp-" in d.name:
                if now - d.stat().st_mtime > _STALE_TMP_S:
                    shutil.rmtree(d, ignore_errors=True)  # a crashed fetch's leftovers
                continue
            if d.name != keep:
                entries.append((d.stat().st_mtime, d, _entry_bytes(d)))
        used = sum(n for _, _, n in entries)
        for _, d, n in sorted(entries, key=lambda e: e[0]):
            if used <= budget:
                break
            with open(root / f"{d.name}.lock", "a+b") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a reader (or a fetch) holds it
                shutil.rmtree(d, ignore_errors=True)
                used -= n
