"""Runs that share an output root probe it at the same moment without failing each other.

An intake poll submits several jobs at once into one output root; each proves the root writable
(:func:`slidescore.run.lifecycle.prepare_output_root`) by writing and removing a probe. With one
probe name for all, one job's remove took away another's probe and that job stopped with
"output … cannot be written" (seen as a flaky intake end-to-end test).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from slidescore.errors import OutputLocationError
from slidescore.run.lifecycle import prepare_output_root


def _hammer(root: str, n_threads: int = 8, rounds: int = 40) -> list[BaseException]:
    errors: list[BaseException] = []
    start = threading.Barrier(n_threads)

    def work() -> None:
        start.wait()
        for _ in range(rounds):
            try:
                prepare_output_root(root)
            except BaseException as e:  # noqa: BLE001 — collected and asserted on
                errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_concurrent_probes_of_one_local_root_all_succeed_and_leave_nothing(tmp_path: Path) -> None:
    root = tmp_path / "out"
    assert _hammer(str(root)) == []
    assert list(root.iterdir()) == []  # every probe removed


@pytest.mark.s3
def test_concurrent_probes_of_one_s3_root_all_succeed(s3fs_client) -> None:
    s3fs_client.mkdir("probe-race")
    assert _hammer("s3://probe-race/out", n_threads=4, rounds=5) == []
    s3fs_client.invalidate_cache()
    assert not s3fs_client.exists("probe-race/out") or s3fs_client.ls("probe-race/out") == []


def test_an_unwritable_root_is_still_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("in the way")
    with pytest.raises(OutputLocationError, match="cannot be written"):
        prepare_output_root(str(blocker))
