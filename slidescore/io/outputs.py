"""Small output files of a sample (JSON, CSV, GeoJSON, PNG, markers) at a local path or a URL.

An output location is a local path or any fsspec URL (``s3://bucket/prefix``); :func:`join` builds
locations from parts without ever passing a URL through :class:`~pathlib.Path` (which would fold
``s3://`` into ``s3:/``). Local paths keep their exact historical behaviour.

Atomicity, the unit every invariant rests on (block marker after its chunks, ``_SUCCESS`` last):

- local: every file is written to a temporary name unique to the process, thread and call and
  renamed (``os.replace``), so a crash never leaves half a file, two writers of one file (threads of
  one process included) never share a temporary file, and a rerun overwrites with identical bytes;
  a failed write removes its temporary file;
- object stores: there is no rename, but a single PUT of one object is atomic and, on S3 since
  2020, strongly read-after-write consistent. Every output file here is small and written with one
  PUT (:func:`write_bytes`), so a reader sees the old object, the new one, or none — never half.
  Zarr chunks are single PUTs as well. ``failures.jsonl`` has no append on S3: it is read, extended
  and PUT again (only the run's driver writes it, so there is one writer).

Conditional writes, for the lease that lets one run at a time write a sample folder
(:mod:`slidescore.stages.lease`): :func:`create_exclusive` writes a file only if none exists and
:func:`replace_if_unchanged` overwrites one only if it is still the version that was read
(:func:`read_versioned`). Local: a complete temporary file hard-linked into place (``os.link`` fails
when the name exists; ``O_CREAT | O_EXCL`` where hard links are not supported), and a swap that
reads, compares and replaces under an exclusive ``flock`` of a lock file beside it. S3:
``If-None-Match: *`` and ``If-Match: <ETag>`` PUTs (conditional writes: AWS S3 since 2024, MinIO,
moto); any other fsspec store gets its own ``pipe_file(mode="create")`` and a read-compare-write,
which are best effort.

Remote calls go through :func:`~slidescore.io.storage.with_retries` (transient errors are retried,
the others mapped onto the error tree).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from slidescore.errors import SampleNotFoundError
from slidescore.io.storage import filesystem, is_local, protocol_of, with_retries


def join(root: str | Path, *parts: str) -> str:
    """``root/part/…`` for a local path or a URL (``s3://b/out`` + ``x`` → ``s3://b/out/x``)."""
    if isinstance(root, Path) or is_local(str(root)):
        return str(Path(local_path(root), *parts))
    return "/".join([str(root).rstrip("/"), *(p.strip("/") for p in parts)])


def local_path(uri: str | Path) -> str:
    """A local location as a plain path (``file:///x`` → ``/x``; plain paths unchanged)."""
    s = str(uri)
    return filesystem(s)[1] if "://" in s else s


def exists(uri: str | Path) -> bool:
    """Whether an output file or folder exists (remote: fresh, never from a listing cache)."""
    if isinstance(uri, Path) or is_local(str(uri)):
        return Path(local_path(uri)).exists()
    fs, path = filesystem(str(uri))
    fs.invalidate_cache(path)  # another process (a Ray actor) may have written it since we last listed
    return bool(with_retries(lambda: fs.exists(path), str(uri), "checking an output"))


def write_bytes(uri: str | Path, data: bytes) -> None:
    """Write one file atomically: local temp file + rename; remote one PUT."""
    if isinstance(uri, Path) or is_local(str(uri)):
        path = Path(local_path(uri))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_name(path)
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return
    fs, path_s = filesystem(str(uri))
    with_retries(lambda: fs.pipe_file(path_s, data), str(uri), "writing an output")


def read_bytes(uri: str | Path) -> bytes:
    if isinstance(uri, Path) or is_local(str(uri)):
        return Path(local_path(uri)).read_bytes()
    fs, path = filesystem(str(uri))
    fs.invalidate_cache(path)
    return bytes(with_retries(lambda: fs.cat_file(path), str(uri), "reading an output"))


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def read_text(path: str | Path) -> str:
    return read_bytes(path).decode()


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=_default) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(read_text(path))


def append_jsonl(path: str | Path, obj: Any) -> None:
    line = json.dumps(obj, default=_default) + "\n"
    if isinstance(path, Path) or is_local(str(path)):
        p = Path(local_path(path))
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:  # a line torn by a crash has no newline: start ours on a line of its own
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
                f.seek(0, os.SEEK_END)
                if torn:
                    line = "\n" + line
            f.write(line.encode())
        return
    # no append on object stores: read, extend, PUT (one writer, the driver; see the module docstring)
    old = read_text(path) if exists(path) else ""
    if old and not old.endswith("\n"):
        old += "\n"
    write_text(path, old + line)


def write_csv(path: str | Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for row in rows:
        w.writerow(row)
    write_text(path, buf.getvalue())


def remove(uri: str | Path) -> None:
    """Delete a file or a whole folder / prefix if it exists."""
    if isinstance(uri, Path) or is_local(str(uri)):
        p = Path(local_path(uri))
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        return
    if not exists(uri):
        return
    fs, path = filesystem(str(uri))
    with_retries(lambda: fs.rm(path, recursive=True), str(uri), "removing a stale output")
    fs.invalidate_cache(path)


def list_children(uri: str) -> dict[str, tuple[str, bool]]:
    """Name → (location, is a folder) of the entries right under a local folder or an object-store
    prefix (``{}`` when there is none). Object stores are listed afresh: other processes (Ray
    actors, other jobs) may have written since the last listing."""
    if is_local(uri):
        root = Path(local_path(uri))
        return {p.name: (str(p), p.is_dir()) for p in root.iterdir()} if root.is_dir() else {}
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)
    try:
        found = with_retries(lambda: fs.ls(path, detail=True), uri, "listing outputs")
    except SampleNotFoundError:
        return {}
    out = {}
    for e in found:
        name = str(e["name"]).rstrip("/").rsplit("/", 1)[-1]
        if str(e["name"]).rstrip("/") != path.rstrip("/"):  # a file's listing holds the file itself
            out[name] = (join(uri, name), e.get("type") == "directory")
    return out


def make_dirs(uri: str | Path) -> None:
    """Create a local folder (object stores have no folders: nothing to do)."""
    if isinstance(uri, Path) or is_local(str(uri)):
        Path(local_path(uri)).mkdir(parents=True, exist_ok=True)


def create_exclusive(uri: str | Path, data: bytes) -> bool:
    """Write a file only if none exists, atomically: ``True`` = this call wrote it, ``False`` = one was there.

    Local: the bytes go to a temporary file first, hard-linked to the name (``os.link`` fails when the
    name exists), so a reader never sees half a file; where the file system has no hard links,
    ``O_CREAT | O_EXCL`` then a write (a reader may then see the file briefly empty). S3: one PUT with
    ``If-None-Match: *``. Remote retries make ``False`` ambiguous (the first try may have written
    before a timeout): callers that must know put a unique token in ``data`` and read it back.
    """
    if isinstance(uri, Path) or is_local(str(uri)):
        path = Path(local_path(uri))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_name(path)
        try:
            tmp.write_bytes(data)
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            except OSError:  # no hard links here (some FUSE, SMB, vfat mounts)
                try:
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                return True
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return _conditional_put(str(uri), data, "creating an output", FileExistsError, mode="create")


def read_versioned(uri: str | Path) -> tuple[bytes, str] | None:
    """A file's bytes and a version tag for :func:`replace_if_unchanged`; ``None`` when it is absent.

    S3: the bytes and the ETag of one GET (so they belong together); elsewhere a hash of the bytes.
    """
    if isinstance(uri, Path) or is_local(str(uri)):
        try:
            data = Path(local_path(uri)).read_bytes()
        except FileNotFoundError:
            return None
        return data, _digest(data)
    fs, path = filesystem(str(uri))
    fs.invalidate_cache(path)
    try:
        if _is_s3(str(uri), fs):
            got = with_retries(lambda: _s3_get(fs, path), str(uri), "reading an output")
            return got[0], got[1]
        data = bytes(with_retries(lambda: fs.cat_file(path), str(uri), "reading an output"))
    except SampleNotFoundError:
        return None
    return data, _digest(data)


def replace_if_unchanged(uri: str | Path, version: str, data: bytes) -> bool:
    """Overwrite a file only if it is still at ``version`` (from :func:`read_versioned`): compare and swap.

    ``False`` when it changed or vanished since it was read (nothing is written then). Local: read,
    compare and replace (temporary file + ``os.replace``: the name never disappears, so a concurrent
    :func:`create_exclusive` cannot slip in) under an exclusive ``flock`` of ``.<name>.lock`` beside
    it, which serialises the swappers of every process and thread on this machine (and on NFS,
    where Linux maps ``flock`` onto its byte-range locks). S3: one PUT with ``If-Match: <ETag>``.
    """
    if isinstance(uri, Path) or is_local(str(uri)):
        path = Path(local_path(uri))
        with _flocked(path.with_name(f"{path.name}.lock" if path.name.startswith(".") else f".{path.name}.lock")):
            try:
                old = path.read_bytes()
            except FileNotFoundError:
                return False
            if _digest(old) != version:
                return False
            write_bytes(path, data)
            return True
    fs, path_s = filesystem(str(uri))
    if not _is_s3(str(uri), fs):  # no conditional write known for this store: best effort
        now = read_versioned(uri)
        if now is None or now[1] != version:
            return False
        write_bytes(uri, data)
        return True
    return _conditional_put(str(uri), data, "replacing an output", FileNotFoundError, IfMatch=version)


def _conditional_put(uri: str, data: bytes, what: str, refused: type[OSError], **condition: Any) -> bool:
    """One conditional PUT (``mode="create"``: If-None-Match; ``IfMatch``): ``False`` when the store
    refuses it (412, or ``refused``: the object exists / is gone), retried like every remote call."""
    fs, path_s = filesystem(uri)

    def put() -> bool:
        try:
            fs.pipe_file(path_s, data, **condition)
            return True
        except refused:
            return False
        except OSError as e:
            if _precondition_failed(e):
                return False
            raise

    try:
        return bool(with_retries(put, uri, what))
    finally:
        fs.invalidate_cache(path_s)


@contextlib.contextmanager
def _flocked(lock_path: Path) -> Iterator[None]:
    """An exclusive ``flock`` of a lock file for the duration (no locking where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: best effort
        yield
        return
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _temp_name(path: Path, what: str = "tmp") -> Path:
    """A temporary name next to ``path``, unique to this process, thread and call."""
    return path.with_name(f".{path.name}.{what}-{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:12]}")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_s3(uri: str, fs: Any) -> bool:
    return protocol_of(uri) in ("s3", "s3a") and hasattr(fs, "_call_s3")


def _s3_get(fs: Any, path: str) -> tuple[bytes, str]:
    """Bytes and ETag of one S3 object from a single GET."""
    from fsspec.asyn import sync

    async def get() -> tuple[bytes, str]:
        bucket, key, _ = fs.split_path(path)
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        try:
            return bytes(await resp["Body"].read()), str(resp["ETag"])
        finally:
            resp["Body"].close()

    return sync(fs.loop, get)


def _precondition_failed(e: BaseException) -> bool:
    """Whether a storage error is a failed write condition (412, or S3's 409 for racing conditional writes)."""
    for err in (e, e.__cause__):
        resp = getattr(err, "response", None)
        code = str(resp.get("Error", {}).get("Code", "")) if isinstance(resp, dict) else ""
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            return True
    return False


def _default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
