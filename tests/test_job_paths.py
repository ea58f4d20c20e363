"""``jobs.score`` under ``ray job submit --working-dir``: relative local paths are refused with the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.score import refuse_relative_paths_in_ray_copy
from slidescore.config import SampleSpec
from slidescore.errors import ConfigError


def test_relative_paths_are_refused_only_inside_rays_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    refuse_relative_paths_in_ray_copy(["a.tif"], "out")  # a plain checkout: relative paths mean what they say
    copy = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    with pytest.raises(ConfigError, match=r"relative local paths \['a.tif'\].*absolute paths"):
        refuse_relative_paths_in_ray_copy(["a.tif", "/data/b.tif"], "/results")
    with pytest.raises(ConfigError, match=r"\['out'\]"):
        refuse_relative_paths_in_ray_copy(["/data/b.tif"], "out")
    with pytest.raises(ConfigError, match=r"fields/x.tif"):
        refuse_relative_paths_in_ray_copy([SampleSpec("s", ("/data/a.tif", "fields/x.tif"))], "/results")
    refuse_relative_paths_in_ray_copy(["/data/a.tif", "s3://bucket/b.tif", SampleSpec("s", ("/c.tif",))], "s3://bucket/out")
