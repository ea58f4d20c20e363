"""One manifest format, one parser: the job (``samples.manifest``) and the intake poller
(``manifest``) read the same text as the same samples, comments and ``#`` inside URIs included."""

from __future__ import annotations

from pathlib import Path

import pytest

from slidescore.config import JobConfig, SampleSpec, parse_manifest
from slidescore.errors import ConfigError
from slidescore.intake import IntakeConfig, find_samples, read_manifest

# Every feature of the format in one text: comment lines (indented too), trailing comments after
# spaces and tabs, blank and whitespace-only lines, '#' inside URIs, samples of several images,
# one image with an explicit id, CRLF line ends.
TEXT = (
    "# scanner export 2026-05-01\n"
    "s3://b/a#2.svs\n"
    "\n"
    "   \t\n"
    "  # an indented comment\n"
    "s3://b/plain.tif   # a trailing comment\n"
    "s3://b/tab.tif\t# after a tab\n"
    "smear-7: s3://b/f1.tif s3://b/f#2.tif  # two fields\n"
    "solo: /data/one.ome.tiff\r\n"
    "/data/x#y.tif #no space after the hash is still a comment\n"
    "s3://b/end.tif#\n"
)
ENTRIES: list[str | SampleSpec] = [
    "s3://b/a#2.svs",
    "s3://b/plain.tif",
    "s3://b/tab.tif",
    SampleSpec("smear-7", ("s3://b/f1.tif", "s3://b/f#2.tif")),
    SampleSpec("solo", ("/data/one.ome.tiff",)),
    "/data/x#y.tif",
    "s3://b/end.tif#",
]


def _job_entries(path: Path) -> list[str | SampleSpec]:
    return JobConfig.from_dict({"samples": {"manifest": str(path)}}).samples.list_samples()


def test_job_and_poller_read_one_manifest_as_the_same_samples(tmp_path: Path) -> None:
    m = tmp_path / "samples.txt"
    m.write_bytes(TEXT.encode())
    job, poller = _job_entries(m), read_manifest(str(m))
    assert job == poller == ENTRIES
    assert parse_manifest(TEXT, "m") == ENTRIES
    # the poller makes samples of them: plain URIs are named after their files, '#' included
    found = find_samples(IntakeConfig.from_dict({"manifest": str(m), "output": str(tmp_path / "out")}))
    assert [(s.sample_id, s.uris) for s in found.samples] == [
        ("a_2", ("s3://b/a#2.svs",)), ("end.tif_", ("s3://b/end.tif#",)), ("plain", ("s3://b/plain.tif",)),
        ("smear-7", ("s3://b/f1.tif", "s3://b/f#2.tif")), ("solo", ("/data/one.ome.tiff",)),
        ("tab", ("s3://b/tab.tif",)), ("x_y", ("/data/x#y.tif",))]
    assert not found.conflicts and not found.problems


def test_samples_remember_their_manifest_line_for_messages(tmp_path: Path) -> None:
    m = tmp_path / "samples.txt"
    m.write_text(TEXT)
    smear = [e for e in read_manifest(str(m)) if isinstance(e, SampleSpec)][0]
    assert smear.origin == f"manifest: {m} line 8"
    assert smear == SampleSpec("smear-7", smear.uris) and "origin" not in repr(smear)  # for messages only
    job_smear = [e for e in _job_entries(m) if isinstance(e, SampleSpec)][0]
    assert job_smear.origin == f"samples.manifest: {str(m)!r} line 8"


def test_a_byte_order_mark_and_an_empty_manifest(tmp_path: Path) -> None:
    m = tmp_path / "samples.txt"
    m.write_bytes("\ufeffs3://b/a.tif\n".encode())
    assert _job_entries(m) == read_manifest(str(m)) == ["s3://b/a.tif"]
    m.write_text("# nothing yet\n\n")
    assert _job_entries(m) == read_manifest(str(m)) == []


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("s3://b/a.tif s3://b/b.tif", r"line 2: expected one URI per line, or 'ID: URI URI …'"),
        ("s3://b/a.tif#x s3://b/b.tif", "line 2: expected one URI per line"),  # '#' inside a word is no comment
        ("g:", "line 2: sample 'g' lists no image"),
        ("g: # only a comment", "line 2: sample 'g' lists no image"),
        ("g: /a.tif /b.tif /a.tif", r"line 2: sample 'g' lists an image twice \(/a.tif\)"),
        (".g: /a.tif", "line 2: expected a sample id"),
        ("a b: /a.tif", "line 2: expected one URI per line"),
    ],
)
def test_job_and_poller_refuse_the_same_lines(tmp_path: Path, line: str, message: str) -> None:
    m = tmp_path / "samples.txt"
    m.write_text(f"# header\n{line}\n")
    with pytest.raises(ConfigError, match=f"^samples.manifest: {str(m)!r} {message}"):
        _job_entries(m)
    with pytest.raises(ConfigError, match=f"^manifest: {m} {message}"):
        read_manifest(str(m))


def test_unreadable_manifests_are_config_errors(tmp_path: Path) -> None:
    m = tmp_path / "samples.txt"
    m.write_bytes(b"s3://b/\xff.tif\n")
    with pytest.raises(ConfigError, match="samples.manifest: cannot read .*UTF-8"):
        _job_entries(m)
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        read_manifest(str(m))


@pytest.mark.s3
def test_poller_reads_an_s3_manifest_as_the_job_reads_it_locally(tmp_path: Path, s3fs_client) -> None:
    bucket = "manifest-test"
    s3fs_client.mkdir(bucket)
    s3fs_client.pipe(f"{bucket}/samples.txt", TEXT.encode())
    local = tmp_path / "samples.txt"
    local.write_bytes(TEXT.encode())
    assert read_manifest(f"s3://{bucket}/samples.txt") == _job_entries(local) == ENTRIES
