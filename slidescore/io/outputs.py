"""Small output files of a sample (JSON, CSV, GeoJSON, PNG, markers) at a local path or a URL.

An output location is a local path or any fsspec URL (``s3://bucket/prefix``); :func:`join` builds
locations from parts without ever passing a URL through :class:`~pathlib.Path` (which would fold
``s3://`` into ``s3:/``). Local paths keep their exact historical behaviour.

Atomicity, the unit every invariant rests on (block marker after its chunks, ``_SUCCESS`` last):

- local: every file is written to a temporary name and renamed (``os.replace``), so a crash never
  leaves half a file and a rerun overwrites with identical bytes;
- object stores: there is no rename, but a single PUT of one object is atomic and, on S3 since
  2020, strongly read-after-write consistent. Every output file here is small and written with one
  PUT (:func:`write_bytes`), so a reader sees the old object, the new one, or none — never half.
  Zarr chunks are single PUTs as well. ``failures.jsonl`` has no append on S3: it is read, extended
  and PUT again (only the run's driver writes it, so there is one writer).

Remote calls go through :func:`~slidescore.io.storage.with_retries` (transient errors are retried,
the others mapped onto the error tree).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

from slidescore.errors import SampleNotFoundError
from slidescore.io.storage import filesystem, is_local, with_retries


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
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
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
        with open(p, "a") as f:
            f.write(line)
        return
    # no append on object stores: read, extend, PUT (one writer, the driver; see the module docstring)
    old = read_text(path) if exists(path) else ""
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


def _default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
