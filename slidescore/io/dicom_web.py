"""DICOMweb access for the DICOM WSI reader: parse a ``dicomweb+http(s)://`` series URL, open the
series through ``dicomweb-client`` (wsidicom's web source), and map HTTP failures onto the error tree.

A series is named by its WADO-RS URL behind a ``dicomweb+`` scheme:
``dicomweb+https://host/dicom-web/studies/<study uid>/series/<series uid>``. Frames are fetched in
the transfer syntax they are stored in: for every instance one frame is first asked for with
``transfer-syntax=*`` (the server's choice, which is the stored one), and only that syntax is then
requested. wsidicom's own probe would ask for JPEG baseline first, which a server may transcode to
(lossless data silently made lossy) or, as Orthanc 1.10 does for JPEG 2000, answer with HTTP 500
instead of the 406 the standard asks for.
"""

from __future__ import annotations

import re
import threading
import warnings
from typing import Any

import requests

from slidescore.errors import (
    InputError,
    SampleNotFoundError,
    TransientStorageError,
    UnsupportedImageError,
)

SCHEMES = ("dicomweb+http://", "dicomweb+https://")
#: SOP class UID of VL Whole Slide Microscopy Image Storage
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
_SERIES_URL = re.compile(r"^(?P<base>https?://[^/?#]+(?:/[^?#]*?)?)/studies/(?P<study>[0-9.]+)/series/(?P<series>[0-9.]+)/?$")
#: seconds to wait for a DICOMweb server to connect / answer one request
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0


def is_dicomweb(uri: str) -> bool:
    return uri.lower().startswith(SCHEMES)


def parse_series_url(uri: str) -> tuple[str, str, str]:
    """``(base URL, study UID, series UID)`` of a ``dicomweb+http(s)://…/studies/…/series/…`` URL."""
    m = _SERIES_URL.match(uri[len("dicomweb+"):]) if is_dicomweb(uri) else None
    if m is None:
        raise InputError(
            f"{uri}: not a DICOMweb series URL; expected dicomweb+http(s)://host[:port]/<prefix>/studies/<study uid>/series/"
            "<series uid> (e.g. dicomweb+http://pacs:8042/dicom-web/studies/1.2.3/series/1.2.3.4)", uri=uri)
    return m.group("base"), m.group("study"), m.group("series")


class _TimeoutSession(requests.Session):
    """A session whose requests time out (dicomweb-client sets none, and a dead server would hang a sample)."""

    def request(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs.setdefault("timeout", (CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
        return super().request(*args, **kwargs)


def import_wsidicom() -> Any:
    """``wsidicom``, imported without the deprecation warnings its import raises in pydicom 3
    (dicomweb-client imports ``pydicom.encaps.get_frame_offsets``); imported only when a series is
    opened (about 0.7 s)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import wsidicom
        import wsidicom.file.io.wsidicom_io
        import wsidicom.file.io.wsidicom_reader
        import wsidicom.file.wsidicom_file_source
        import wsidicom.geometry  # noqa: F401
    return wsidicom


def stored_syntax_client(base_url: str, session: requests.Session) -> Any:
    """A wsidicom DICOMweb client that accepts, for each instance, only its stored transfer syntax."""
    WsiDicomWebClient = import_wsidicom().WsiDicomWebClient  # noqa: N806

    class StoredSyntaxClient(WsiDicomWebClient):  # type: ignore[misc, valid-type]
        def __init__(self, base_url: str, session: requests.Session) -> None:
            from dicomweb_client.api import DICOMwebClient

            self.dicomweb = DICOMwebClient(base_url, session=session)
            # its default retries every failure 5 times over 30 s (a refused connection too); slidescore
            # retries busy servers itself (TransientStorageError), so one quick second try is enough here
            self.dicomweb.set_http_retry_params(max_attempts=2, wait_exponential_multiplier=250)
            super().__init__(self.dicomweb)
            self._base = base_url.rstrip("/")
            self._session = session
            self._stored: dict[str, str | None] = {}
            self._lock = threading.Lock()

        def stored_syntax(self, study_uid: Any, series_uid: Any, instance_uid: Any) -> str | None:
            """The transfer syntax the server sends frame 1 in when free to choose (``None``: not said)."""
            with self._lock:
                if str(instance_uid) in self._stored:
                    return self._stored[str(instance_uid)]
            url = f"{self._base}/studies/{study_uid}/series/{series_uid}/instances/{instance_uid}/frames/1"
            accept = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
            with self._session.get(url, headers={"Accept": accept}, stream=True) as r:
                r.raise_for_status()
                m = re.search(r"transfer-syntax=\"?([0-9.]+)", r.headers.get("Content-Type", ""))
            syntax = m.group(1) if m else None
            with self._lock:
                self._stored[str(instance_uid)] = syntax
            return syntax

        def is_transfer_syntax_supported(self, study_uid: Any, series_uid: Any, instance_uid: Any, transfer_syntax: Any) -> bool:
            stored = self.stored_syntax(study_uid, series_uid, instance_uid)
            if stored is not None:
                return str(transfer_syntax) == stored
            try:  # the server did not name one: probe as wsidicom does, a refusal of any kind meaning "no"
                return super().is_transfer_syntax_supported(study_uid, series_uid, instance_uid, transfer_syntax)
            except requests.HTTPError as e:
                if e.response is not None and e.response.status_code in (400, 406, 415, 500, 501):
                    return False
                raise

    return StoredSyntaxClient(base_url, session)


def series_instance_uids(uri: str) -> list[str]:
    """The SOP instance UIDs of the series of a ``dicomweb+`` URL, sorted (one QIDO-RS search)."""
    from dicomweb_client.api import DICOMwebClient

    base, study, series = parse_series_url(uri)
    with _TimeoutSession() as session:
        client = DICOMwebClient(base, session=session)
        client.set_http_retry_params(max_attempts=2, wait_exponential_multiplier=250)
        try:
            found = client.search_for_instances(study, series, fields=["00080018"])
        except Exception as e:  # requests' errors, mapped below
            mapped = web_error(e, uri, "listing the series")
            if mapped is None:
                raise
            raise mapped from None
    return sorted(str(i.get("00080018", {}).get("Value", [""])[0]) for i in found)


def open_web_series(uri: str) -> Any:
    """Open the series of a ``dicomweb+`` URL (metadata only; frames are fetched when read)."""
    base, study, series = parse_series_url(uri)
    session = _TimeoutSession()
    try:
        client = stored_syntax_client(base, session)
        found = client.dicomweb.search_for_instances(study, series, fields=["00080016"])
        if not found:
            raise SampleNotFoundError(f"{uri}: the DICOMweb server has no instances in series {series} of study {study}; "
                                      "check the UIDs (and that the series was stored on this server)", uri=uri)
        sops = {str(i.get("00080016", {}).get("Value", [""])[0]) for i in found}
        if WSI_SOP_CLASS not in sops:
            raise UnsupportedImageError(
                f"{uri}: series {series} holds no whole-slide image instances (SOP classes {sorted(sops)}); expected VL Whole "
                f"Slide Microscopy Image Storage ({WSI_SOP_CLASS})", uri=uri)
        with warnings.catch_warnings():  # ICC profiles come as bulk data URIs; slidescore does not colour-manage
            warnings.filterwarnings("ignore", message="No bulk data URI handler", category=UserWarning)
            return import_wsidicom().WsiDicom.open_web(client, study, series)
    except BaseException:
        session.close()
        raise


def web_error(e: BaseException, uri: str, what: str) -> Exception | None:
    """The slidescore error for a failed DICOMweb request (``None``: not an HTTP / connection error)."""
    if isinstance(e, requests.HTTPError):
        code = e.response.status_code if e.response is not None else 0
        if code == 404:
            return SampleNotFoundError(f"{uri}: the DICOMweb server has no such study / series (HTTP 404 while {what}); "
                                       "check the study and series UIDs", uri=uri)
        if code in (401, 403):
            return InputError(f"{uri}: the DICOMweb server refused access (HTTP {code} while {what}); slidescore sends no "
                              "credentials — expose the series without authentication to the scoring nodes", uri=uri)
        if code in (429, 502, 503, 504):
            return TransientStorageError(f"{uri}: DICOMweb server busy (HTTP {code} while {what})", uri=uri)
        return InputError(f"{uri}: DICOMweb request failed (HTTP {code} while {what}: {e})", uri=uri)
    if isinstance(e, requests.Timeout):
        return TransientStorageError(f"{uri}: DICOMweb request timed out while {what}", uri=uri)
    if isinstance(e, requests.ConnectionError):
        return InputError(f"{uri}: cannot reach the DICOMweb server while {what} ({type(e).__name__}); check the host, "
                          "port and prefix in the URL and that the server is running", uri=uri)
    return None
