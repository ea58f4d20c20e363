"""Fixtures of the io tests: a real DICOMweb server (Orthanc with its DICOMweb plugin) on loopback,
started once per session and stopped at its end (see :mod:`tests.io.dicom_fixtures`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.io.dicom_fixtures import Orthanc, start_orthanc, stop_orthanc


@pytest.fixture(scope="session")
def orthanc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) on a free loopback port, with a temporary
    storage folder, no DICOM port, no authentication; yields it, stops it after the session."""
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield server
    finally:
        stop_orthanc(server)
