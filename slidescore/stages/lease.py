"""One run at a time writes a sample folder: the sample lease, and tolerant reads of the run markers.

A run that is about to write under ``<output>/<sample-id>/`` first takes the folder's lease,
``<sample>/.lease`` (JSON: ``run_key``, ``host``, ``pid``, ``token``, ``acquired``, ``renewed``,
``expires``), with an atomic create-if-absent (:func:`~slidescore.io.outputs.create_exclusive`:
``os.link`` of a complete file locally, a PUT with ``If-None-Match: *`` on S3). Without it two runs
of different run keys (another model, other settings) could write one folder at once, and the
mosaic would end up holding chunks of both — and be marked complete.

- **Same run key: re-entrant.** Resuming after a crash, and the driver and the actors of one run,
  share the lease; taking it again renews it.
- **Another run key, not expired: refused.** That sample fails with an
  :class:`~slidescore.errors.InputError` naming the holder (run key, host, pid, since when) and
  saying how to end the wait. ``--overwrite`` does not override it: it replaces finished results,
  never a folder another run is writing.
- **Expired (or unreadable) lease: taken over**, with a compare-and-swap
  (:func:`~slidescore.io.outputs.replace_if_unchanged`: an ``If-Match`` PUT on S3; locally a
  read-compare-replace under an ``flock`` of ``.lease.lock``, an empty file left beside the lease),
  so of several runs that find one expired lease exactly one takes it. Logged at WARNING.
- **Released when done.** The run marks its lease released (:func:`release_lease`: a compare-and-
  swap, never a delete) right after the sample's ``_SUCCESS``, and when the sample fails (nothing
  more will be written there), so a run of another key may take the folder at once. A release is
  never needed for correctness: a ``_SUCCESS`` of the lease's own run key already means its holder
  is done (a crash between the marker and the release frees nothing late), and a lease nobody
  releases expires. It only matters when the marker is later damaged, or the sample failed.

Time to live: :data:`DEFAULT_TTL_S` (6 h), or ``SLIDESCORE_LEASE_TTL_S`` seconds. A lease is renewed
when it is taken again (every resume) and by :func:`renew_lease` (when a sample finishes; a runner
may also call it every so often while a long sample scores). Expiry is the holder's clock plus the
TTL, read against the reader's clock: skew of minutes does not matter against hours. A crashed
run's lease holds its folder until it expires or someone removes ``.lease``; whether the holder
still lives is not probed (a pid means nothing on another host, or in another container with the
same host name).

Where no conditional write exists (object stores other than S3, file systems without hard links)
the lease is best effort: it still stops a run that starts while another one is writing, but two
runs starting within the same instant might both get it.

The tolerant readers (:func:`finished_key`, :func:`read_run_key_file`) treat an empty or garbage
``_SUCCESS`` / ``.run_key`` (a crash of an older version, a truncated copy) as absent, with a
WARNING, instead of stopping the run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime

from slidescore.errors import ConfigError, InputError
from slidescore.io.outputs import (
    create_exclusive,
    join,
    read_bytes,
    read_versioned,
    replace_if_unchanged,
)
from slidescore.stages.layout import SUCCESS

log = logging.getLogger(__name__)

LEASE = ".lease"
DEFAULT_TTL_S = 6 * 3600.0
TTL_ENV = "SLIDESCORE_LEASE_TTL_S"
_ATTEMPTS = 8  # rounds of read → decide → conditional write before giving up on a contended lease


@dataclass(frozen=True)
class Lease:
    """The holder of a sample folder (what ``<sample>/.lease`` holds)."""

    run_key: str
    host: str
    pid: int
    token: str  # unique per write: tells whose write a read-back holds
    acquired: str  # ISO-8601 UTC, when this run key first took the folder
    renewed: str
    expires: str
    released: bool = False

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), indent=2) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Lease:
        """Parse a lease; ``ValueError`` when it is not one (empty, garbage, another layout)."""
        doc = json.loads(data.decode())
        if not isinstance(doc, dict) or not isinstance(doc.get("run_key"), str) or not doc["run_key"]:
            raise ValueError("not a lease record")
        lease = cls(run_key=doc["run_key"], host=str(doc.get("host", "?")), pid=int(doc.get("pid", -1)),
                    token=str(doc.get("token", "")), acquired=str(doc.get("acquired", "?")),
                    renewed=str(doc.get("renewed", "?")), expires=str(doc["expires"]), released=bool(doc.get("released", False)))
        _parse_time(lease.expires)
        return lease

    def expired(self, now: float | None = None) -> bool:
        return self.released or _parse_time(self.expires) <= (time.time() if now is None else now)

    def holder(self) -> str:
        return f"run key {self.run_key}, host {self.host}, pid {self.pid}, since {self.acquired}"


def lease_path(sample_dir: str) -> str:
    return join(sample_dir, LEASE)


def lease_ttl_s() -> float:
    """The lease's time to live: ``SLIDESCORE_LEASE_TTL_S`` seconds, else :data:`DEFAULT_TTL_S`."""
    raw = os.environ.get(TTL_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_TTL_S
    try:
        ttl = float(raw)
    except ValueError:
        ttl = -1.0
    if not ttl > 0:
        raise ConfigError(f"{TTL_ENV}: expected a positive number of seconds, got {raw!r}; unset it for {DEFAULT_TTL_S:.0f} s")
    return ttl


def acquire_lease(sample_dir: str, run_key: str, *, sample_id: str | None = None, uri: str | None = None,
                  ttl_s: float | None = None) -> Lease:
    """Take (or, for the same run key, renew) the lease of a sample folder before writing under it.

    Raises :class:`~slidescore.errors.InputError` when another run key holds a live lease.
    """
    sid = sample_id or _name(sample_dir)
    path = lease_path(sample_dir)
    for _ in range(_ATTEMPTS):
        mine = _new_lease(run_key, ttl_s)
        if create_exclusive(path, mine.to_bytes()):
            return _hold(sample_dir, mine)
        cur = read_versioned(path)
        if cur is None:
            continue  # taken over and released between our two calls: try again
        data, version = cur
        held = _parse(data, path)
        if held is not None and held.token == mine.token:
            return _hold(sample_dir, mine)  # our own create, retried after a timeout, found itself
        if held is not None and held.run_key == run_key and not held.released:
            mine = replace(mine, acquired=held.acquired)  # re-entrant: the same run renews it
        elif held is not None and not _free(held, sample_dir):
            raise _busy(sid, sample_dir, held, uri)
        elif held is not None:
            log.warning("sample %s: taking over the %s lease of %s (%s, expires %s)", sid,
                        "released" if held.released else "expired" if held.expired() else "finished",
                        sample_dir, held.holder(), held.expires)
        else:
            log.warning("sample %s: the lease %s is unreadable; taking it over", sid, path)
        if replace_if_unchanged(path, version, mine.to_bytes()):
            return _hold(sample_dir, mine)
        # it changed between our read and our write (another run took it, or its holder renewed it): look again
    raise InputError(f"sample {sid!r}: could not take the lease {path}: it changed {_ATTEMPTS} times while this "
                     "run tried; several runs are contending for this sample folder — run one at a time", uri=uri)


def check_lease(sample_dir: str, run_key: str, *, sample_id: str | None = None, uri: str | None = None) -> None:
    """Read only: raise what :func:`acquire_lease` would if another live run holds the folder."""
    cur = read_versioned(lease_path(sample_dir))
    if cur is None:
        return
    held = _parse(cur[0], lease_path(sample_dir))
    if held is not None and held.run_key != run_key and not _free(held, sample_dir):
        raise _busy(sample_id or _name(sample_dir), sample_dir, held, uri)


def renew_lease(sample_dir: str, run_key: str, *, sample_id: str | None = None, ttl_s: float | None = None) -> Lease:
    """Extend this run's lease (before a sample's completion marker; while a long one scores).

    Raises :class:`~slidescore.errors.InputError` when another run key has taken the folder over
    (this run's lease had expired): this run must then write nothing more there, its completion
    marker least of all. A lease that vanished (removed by hand) is taken again.
    """
    sid = sample_id or _name(sample_dir)
    path = lease_path(sample_dir)
    for _ in range(_ATTEMPTS):
        cur = read_versioned(path)
        if cur is None:
            return acquire_lease(sample_dir, run_key, sample_id=sid, ttl_s=ttl_s)
        held = _parse(cur[0], path)
        if held is None or held.run_key != run_key:
            who = held.holder() if held is not None else "an unreadable lease"
            raise InputError(f"sample {sid!r}: this run's lease of {sample_dir} was taken over ({who}) after it "
                             f"expired; the sample was left to that run — raise {TTL_ENV} for samples this long")
        mine = replace(_new_lease(run_key, ttl_s), acquired=held.acquired)
        if replace_if_unchanged(path, cur[1], mine.to_bytes()):
            return _hold(sample_dir, mine)
    raise InputError(f"sample {sid!r}: could not renew the lease {path}: it changed {_ATTEMPTS} times while this run tried")


def release_lease(sample_dir: str, run_key: str) -> bool:
    """Mark the folder's lease released if it is ``run_key``'s and this process wrote it last;
    ``False`` when there is nothing of ours to release.

    Call it when this run will write nothing more in the folder: after ``_SUCCESS`` (the marker alone
    frees the lease too, but a marker damaged later would not), or when the sample failed after it
    was planned, so that a run of another key may take the folder at once instead of after the TTL.
    A lease that another process of the same run renewed since is left alone: that process still
    writes there. Never raises for storage trouble (logged): a lease left behind only delays a run
    of another key until it expires.
    """
    path = lease_path(sample_dir)
    try:
        for _ in range(_ATTEMPTS):
            with _held_lock:
                token = _held.get(path)
            cur = read_versioned(path) if token else None
            if cur is None:
                return False
            held = _parse(cur[0], path)
            if held is None or held.token != token or held.released or held.run_key != run_key:
                return False
            now = _iso(time.time())
            gone = replace(held, token=uuid.uuid4().hex, renewed=now, expires=now, released=True)
            if replace_if_unchanged(path, cur[1], gone.to_bytes()):
                with _held_lock:
                    _held.pop(path, None)
                return True
    except Exception as e:  # noqa: BLE001 — releasing early is a courtesy; the TTL (or _SUCCESS) frees it anyway
        log.warning("could not release the lease %s (%s: %s); it frees itself when it expires", path, type(e).__name__, e)
    return False


# the token of this process's last write of each lease it holds (what release_lease may release)
_held: dict[str, str] = {}
_held_lock = threading.Lock()


def _hold(sample_dir: str, lease: Lease) -> Lease:
    with _held_lock:
        _held[lease_path(sample_dir)] = lease.token
    return lease


def finished_key(sample_dir: str) -> str | None:
    """The run key in the sample's ``_SUCCESS``; ``None`` when it is absent or unreadable (= not finished)."""
    marker = join(sample_dir, SUCCESS)
    data = _read_optional(marker)
    if data is None:
        return None
    try:
        doc = json.loads(data.decode())
        key = doc.get("run_key") if isinstance(doc, dict) else None
        if not isinstance(key, str) or not key:
            raise ValueError("no run key in it")
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError included
        log.warning("completion marker %s is unreadable (%s: %s); treating the sample as not finished",
                    marker, type(e).__name__, e)
        return None
    return key


def read_run_key_file(key_file: str) -> str | None:
    """The run key in a ``.run_key`` file; ``None`` when it is absent or unreadable (= no outputs to resume)."""
    data = _read_optional(key_file)
    if data is None:
        return None
    try:
        key = data.decode().strip()
    except ValueError as e:
        log.warning("run key file %s is unreadable (%s); its outputs will be written afresh", key_file, e)
        return None
    if not key or len(key) > 128 or not key.isprintable() or any(c.isspace() for c in key):
        log.warning("run key file %s holds no run key (%r); its outputs will be written afresh", key_file, key[:40])
        return None
    return key


def _read_optional(uri: str) -> bytes | None:
    try:
        return read_bytes(uri)
    except FileNotFoundError:  # SampleNotFoundError (remote) is one
        return None
    except IsADirectoryError as e:
        log.warning("%s is a folder, not a marker (%s); treating it as absent", uri, e)
        return None


def _free(held: Lease, sample_dir: str) -> bool:
    """Whether another run's lease no longer holds the folder: expired, released, or its run finished."""
    return held.expired() or finished_key(sample_dir) == held.run_key


def _busy(sample_id: str, sample_dir: str, held: Lease, uri: str | None) -> InputError:
    return InputError(
        f"sample {sample_id!r}: {sample_dir} is being written by another run ({held.holder()}); wait for it, "
        f"or if it crashed remove {lease_path(sample_dir)} (or wait until {held.expires})",
        uri=uri, lease=asdict(held),
    )


def _parse(data: bytes, path: str) -> Lease | None:
    try:
        return Lease.from_bytes(data)
    except (ValueError, TypeError, KeyError) as e:
        log.warning("lease %s is unreadable (%s: %s); treating it as absent", path, type(e).__name__, e)
        return None


def _new_lease(run_key: str, ttl_s: float | None) -> Lease:
    now = time.time()
    ttl = lease_ttl_s() if ttl_s is None else ttl_s
    return Lease(run_key=run_key, host=socket.gethostname(), pid=os.getpid(), token=uuid.uuid4().hex,
                 acquired=_iso(now), renewed=_iso(now), expires=_iso(now + ttl))


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _parse_time(s: str) -> float:
    dt = datetime.fromisoformat(s)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _name(sample_dir: str) -> str:
    return str(sample_dir).rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]
