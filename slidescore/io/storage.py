"""Storage access through fsspec: local paths, ``s3://`` (s3fs) and other fsspec URLs.

One filesystem instance per process and endpoint (fsspec caches instances; each Ray worker process
builds its own). Endpoints and credentials come from the environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID`` …, or the cloud's workload identity), never from configs. Image files are
opened with a block cache sized for tile reads, never downloaded whole. Storage failures are mapped
onto the error tree: missing → :class:`SampleNotFoundError`, access denied or a bad endpoint →
:class:`InputError` with the fix, throttling / timeouts / 5xx → :class:`TransientStorageError`
(retried with exponential backoff by :func:`with_retries`).
"""

from __future__ import annotations

import errno
import os
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec

from slidescore.errors import InputError, SampleNotFoundError, TransientStorageError

T = TypeVar("T")

READ_BLOCK_BYTES = 1 << 20
READ_CACHE_BLOCKS = 32
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "InternalError", "ServiceUnavailable", "503", "500", "502", "504"}


def protocol_of(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def is_local(uri: str) -> bool:
    return protocol_of(uri) in ("file", "local")


def storage_options(uri: str) -> dict[str, Any]:
    """fsspec options for a URI's protocol (S3: timeouts, adaptive retries, connection pool)."""
    if protocol_of(uri) in ("s3", "s3a"):
        opts: dict[str, Any] = {
            "config_kwargs": {
                "connect_timeout": float(os.environ.get("SLIDESCORE_S3_CONNECT_TIMEOUT", "10")),
                "read_timeout": float(os.environ.get("SLIDESCORE_S3_READ_TIMEOUT", "60")),
                "retries": {"max_attempts": int(os.environ.get("SLIDESCORE_S3_MAX_ATTEMPTS", "4")),
                            "mode": os.environ.get("SLIDESCORE_S3_RETRY_MODE", "adaptive")},
                "max_pool_connections": 16,
            },
        }
        if os.environ.get("AWS_ENDPOINT_URL"):
            opts["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
        return opts
    return {}


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The (cached) filesystem of a URI and the path inside it."""
    fs, path = fsspec.core.url_to_fs(uri, **storage_options(uri))
    return fs, path


def classify(exc: BaseException, uri: str, what: str) -> Exception:
    """Map a storage exception to slidescore's error tree, with a message that names the fix."""
    if isinstance(exc, InputError | TransientStorageError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return SampleNotFoundError(f"{uri}: not found while {what}; check the bucket, key and spelling", uri=uri)
    if isinstance(exc, PermissionError):
        return InputError(f"{uri}: access denied while {what}; check the credentials (AWS_* or workload identity) "
                          "and the bucket policy allow s3:GetObject and s3:ListBucket", uri=uri)
    code = ""
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        code = str(resp.get("Error", {}).get("Code", ""))
    name = type(exc).__name__
    text = str(exc)
    # s3fs turns SlowDown/503 into OSError(EBUSY, "Please reduce your request rate.") once its own retries are spent
    busy = isinstance(exc, OSError) and exc.errno == errno.EBUSY
    if code in _TRANSIENT_CODES or name in ("ReadTimeoutError", "ConnectTimeoutError", "TimeoutError", "ServerDisconnectedError") \
            or busy or "SlowDown" in text or "503" in text or "reduce your request rate" in text:
        return TransientStorageError(f"{uri}: transient storage error while {what} ({name}: {text})", uri=uri)
    if name in ("EndpointConnectionError", "ClientConnectorError", "ConnectionRefusedError") or "Could not connect" in text \
            or isinstance(exc, ConnectionError):
        return InputError(f"{uri}: cannot reach the storage endpoint while {what} ({text}); check AWS_ENDPOINT_URL "
                          f"(now {os.environ.get('AWS_ENDPOINT_URL', 'unset')}) and the network", uri=uri)
    if code in ("NoSuchBucket",):
        return SampleNotFoundError(f"{uri}: bucket does not exist; check the bucket name", uri=uri)
    return InputError(f"{uri}: storage error while {what} ({name}: {text})", uri=uri)


def _storage_like(e: BaseException) -> bool:
    mod = type(e).__module__.split(".")[0]
    return isinstance(e, OSError | InputError | TransientStorageError) or hasattr(e, "response") or \
        mod in ("botocore", "aiobotocore", "aiohttp", "s3fs", "urllib3", "requests")


def with_retries(fn: Callable[[], T], uri: str, what: str, *, attempts: int = 4, base_delay_s: float = 0.2) -> T:
    """Call ``fn``; retry transient failures with jittered exponential backoff; map errors."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:  # storage stacks raise many types; classify() sorts them
            if not _storage_like(e):
                raise  # e.g. a decoder error: the caller knows what it means
            err = classify(e, uri, what)
            if not isinstance(err, TransientStorageError) or attempt == attempts - 1:
                raise err from e
            time.sleep(base_delay_s * 2**attempt * (1 + random.random()))
    raise AssertionError("unreachable")


def info(uri: str) -> dict[str, Any]:
    fs, path = filesystem(uri)
    return with_retries(lambda: fs.info(path), uri, "reading its metadata")


def open_binary(uri: str) -> Any:
    """A seekable read handle with a block cache suited to tile reads (no whole-file download)."""
    fs, path = filesystem(uri)
    if is_local(uri):
        return with_retries(lambda: open(path, "rb"), uri, "opening it")
    return with_retries(
        lambda: fs.open(path, "rb", block_size=READ_BLOCK_BYTES, cache_type="blockcache",
                        cache_options={"maxblocks": READ_CACHE_BLOCKS}),
        uri, "opening it",
    )


def fingerprint(uri: str) -> dict[str, Any]:
    """What identifies the input's content for run keys: size plus ETag (object stores) or mtime."""
    meta = info(uri)
    fp: dict[str, Any] = {"uri": uri if not is_local(uri) else os.path.abspath(filesystem(uri)[1]),
                          "size_bytes": int(meta.get("size") or 0)}
    etag = meta.get("ETag") or meta.get("etag")
    if etag:
        fp["etag"] = str(etag).strip('"')
    elif "mtime" in meta:
        fp["mtime"] = float(meta["mtime"]) if not hasattr(meta["mtime"], "timestamp") else meta["mtime"].timestamp()
    return fp


IMAGE_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".btf", ".tf8", ".ome.tif", ".ome.tiff", ".zarr", ".ome.zarr",
                  ".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide")  # the last: OpenSlide formats (io.open)


DICOM_SUFFIX = ".dcm"  # instances of a DICOM WSI series (io.dicom): a folder of them is one image
IMAGE, SERIES, PARTS, FOLDER, OTHER = "image", "series", "parts", "folder", "other"


def _base(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


def holds_dicom(entries: list[dict[str, Any]]) -> bool:
    """Whether a folder's listing holds DICOM instances (files named ``*.dcm``): a DICOM WSI series."""
    return any(e.get("type") != "directory" and _base(str(e["name"])).lower().endswith(DICOM_SUFFIX) for e in entries)


def list_entries(uri: str) -> list[dict[str, Any]]:
    """A folder's or prefix's entries (``fs.ls`` with details), freshly listed: fsspec caches listings
    per process, and a poller must see new files."""
    fs, path = filesystem(uri)
    fs.invalidate_cache(path.rstrip("/"))
    return list(with_retries(lambda: fs.ls(path.rstrip("/"), detail=True), uri, "listing the prefix"))


def classify_entries(prefix: str, entries: list[dict[str, Any]], *, look_inside: bool = True) -> dict[str, str]:
    """What each entry of one listing of ``prefix`` is, by URI.

    ``image``: a file with an image extension (:data:`IMAGE_SUFFIXES`) or a ``*.zarr`` folder;
    ``series``: a sub-folder holding ``.dcm`` instances, one DICOM WSI series (one image: its
    instances are not images of their own); ``parts``: the data folder of a MIRAX slide
    (``<name>/`` beside ``<name>.mrxs``), read with the slide; ``folder``: any other sub-folder;
    ``other``: any other file (a ``.dcm`` instance, a VMS's ``.jpg`` parts — the ``.vms`` is the
    image —, notes). With ``look_inside`` (one LIST per sub-folder whose name starts with neither
    ``.`` nor ``_``) sub-folders are told apart as ``series`` or ``folder``; without, they are all
    ``folder`` (the caller lists them itself).
    """
    local = is_local(prefix)
    # fsspec lists a local symlink as type "other", whatever it points at: a linked series is a folder
    dirs = {str(e["name"]) for e in entries if e.get("type") == "directory"
            or (local and e.get("islink") and os.path.isdir(str(e["name"])))}
    files = {_base(str(e["name"])).lower() for e in entries if str(e["name"]) not in dirs}
    out = {}
    for e in entries:
        name = str(e["name"]).rstrip("/")
        uri = name if local else f"{protocol_of(prefix)}://{name}"
        low, base = name.lower(), _base(name)
        if str(e["name"]) not in dirs:
            out[uri] = IMAGE if low.endswith(IMAGE_SUFFIXES) else OTHER
        elif low.endswith(".zarr"):
            out[uri] = IMAGE
        elif f"{base.lower()}.mrxs" in files:
            out[uri] = PARTS
        elif look_inside and not base.startswith((".", "_")) and holds_dicom(list_entries(uri)):
            out[uri] = SERIES
        else:
            out[uri] = FOLDER
    return out


def list_images(prefix: str) -> list[str]:
    """Image URIs directly under a folder or object-store prefix, sorted: image files, ``*.zarr``
    folders and DICOM WSI series (a sub-folder of ``.dcm`` instances, as one URI; ``prefix`` itself
    when it holds ``.dcm`` instances), never a MIRAX slide's data folder nor a VMS's ``.jpg`` parts
    (:func:`classify_entries`)."""
    entries = list_entries(prefix)
    kinds = classify_entries(prefix, entries)
    out = [uri for uri, kind in kinds.items() if kind in (IMAGE, SERIES)]
    if holds_dicom(entries):
        out.append(prefix.rstrip("/") if is_local(prefix) else f"{protocol_of(prefix)}://{filesystem(prefix)[1].rstrip('/')}")
    return sorted(out)
