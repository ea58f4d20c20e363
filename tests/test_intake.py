"""The intake poller: grouping (images, sample folders, manifests), run keys, job names, decisions,
RayJob objects, and end to end on a real Ray head (``ray start --head``, token auth, the shared
``ray_head`` fixture) with images and outputs on the loopback S3 server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from slidescore.cli import parse_sample_arg
from slidescore.config import JobConfig, SampleSpec
from slidescore.errors import ConfigError
from slidescore.intake import (
    ACTIVE,
    FAILED,
    MAX_RAYJOB_NAME,
    READY,
    SUCCEEDED,
    Attempt,
    IntakeConfig,
    PollSummary,
    RayJobsBackend,
    SampleState,
    build_rayjob,
    decide,
    find_samples,
    group_samples,
    job_name,
    load_intake_config,
    load_job_config,
    parse_job_name,
    poll,
    rayjob_state,
    read_manifest,
    sample_run_key,
    score_command,
)
from slidescore.io.storage import list_images
from slidescore.model import load_model
from slidescore.stages.plan import plan_images
from tests.conftest import REPO, Head, head_get, textured_image, write_tiff

sys.path.insert(0, str(REPO / "tests" / "k8s"))
from k8s_checks import (  # noqa: E402
    check_kuberay_admission,
    crd_problems,
    object_meta_problems,
    pod_template_problems,
)
from kustomize_lite import render  # noqa: E402


# -- config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["k8s/base/config", "k8s/overlays/example/config"])
def test_deployed_intake_configs_load(where: str) -> None:
    cfg = load_intake_config(REPO / where / "intake.yaml")
    assert cfg.submit == "rayjob" and cfg.intake_prefix and cfg.intake_prefix.startswith("s3://")
    assert cfg.job_config == str((REPO / where / "job.yaml").resolve())  # beside it, as in the ConfigMap mount
    assert (cfg.max_in_flight, cfg.max_attempts) == (4, 3)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"output": "o", "intake_prefix": "p", "max_inflight": 2}, "max_inflight: unknown key"),
        ({"output": "o", "intake_prefix": "p", "max_in_flight": 0}, "max_in_flight: expected a positive integer"),
        ({"output": "o", "intake_prefix": "p", "max_attempts": True}, "max_attempts: expected a positive integer"),
        ({"output": "o", "intake_prefix": "p", "submit": "kubectl"}, r"submit: expected one of \['rayjob', 'ray_jobs'\]"),
        ({"output": "o"}, "intake_prefix: expected a folder or s3:// prefix"),
        ({"intake_prefix": "p"}, "output: required"),
        ({"output": "", "intake_prefix": "p"}, "output: expected a non-empty string"),
        ({"output": "o", "intake_prefix": "p", "settle_s": 0}, "settle_s: expected a positive integer"),
        ({"output": "o", "intake_prefix": "p", "sample_folders": "yes"}, "sample_folders: expected true or false"),
    ],
)
def test_intake_config_errors_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        IntakeConfig.from_dict(data)


# -- grouping, run keys, names --------------------------------------------------------------------
def test_one_image_is_one_sample_and_shared_ids_are_conflicts(tmp_path: Path) -> None:
    uris = ["s3://in/x/a.tif", "s3://in/x/b.ome.tiff", "s3://in/x/c.svs", "s3://in/x/a.svs", "s3://in/x/slide 7.ndpi"]
    samples, conflicts = group_samples(uris)
    assert samples == [SampleSpec("b", ("s3://in/x/b.ome.tiff",)), SampleSpec("c", ("s3://in/x/c.svs",)),
                       SampleSpec("slide_7", ("s3://in/x/slide 7.ndpi",))]
    assert conflicts == {"a": ["s3://in/x/a.tif", "s3://in/x/a.svs"]}
    for name in ("p.tif", "q.tiff", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "r.zarr").mkdir()
    samples, conflicts = group_samples(list_images(str(tmp_path)))
    assert [s.sample_id for s in samples] == ["p", "q", "r"] and not conflicts


def _inbox(tmp_path: Path) -> Path:
    """An intake folder: single images, complete and incomplete sample folders, odd entries."""
    inbox = tmp_path / "inbox"
    for rel in ("a.tif", "b.ome.tiff", "s1/f1.tif", "s1/f2.tif", "s1/notes.txt", "smear 7/f1.tif", "smear 7/f2.svs",
                "one/only.tif", "_quarantine/old.tif", ".partial/x.tif", "bad/readme.txt", "-x/p.tif"):
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (inbox / rel).write_bytes(b"x")
    (inbox / "c.zarr").mkdir()  # an image folder, not a sample folder
    (inbox / "empty").mkdir()
    for rel in ("smear 7", "one", "bad", "-x"):
        (inbox / rel / READY).write_bytes(b"")
    return inbox


def test_sample_folders_are_samples_once_ready(tmp_path: Path) -> None:
    inbox = _inbox(tmp_path)
    cfg = IntakeConfig.from_dict({"intake_prefix": str(inbox), "output": str(tmp_path / "out")})
    found = find_samples(cfg)
    assert found.samples == [SampleSpec("a", (str(inbox / "a.tif"),)), SampleSpec("b", (str(inbox / "b.ome.tiff"),)),
                             SampleSpec("c", (str(inbox / "c.zarr"),)), SampleSpec("one", (str(inbox / "one/only.tif"),)),
                             SampleSpec("smear_7", (str(inbox / "smear 7/f1.tif"), str(inbox / "smear 7/f2.svs")))]
    assert sorted(found.waiting) == ["empty", "s1"] and f"has no {READY} marker yet" in found.waiting["s1"]
    assert f"holds {READY} but no image" in found.problems["bad"] and "rename the folder" in found.problems["-x"]
    assert not found.conflicts  # _quarantine/ and .partial/ are not samples
    (inbox / "s1" / READY).write_bytes(b"")
    found = find_samples(cfg)  # a second listing in this process sees the new marker
    assert [s for s in found.samples if s.sample_id == "s1"] == [SampleSpec("s1", (str(inbox / "s1/f1.tif"), str(inbox / "s1/f2.tif")))]
    assert list(found.waiting) == ["empty"]
    # a folder and an image claiming one id: a conflict, neither is submitted
    write_tiff(inbox / "s1.tif", textured_image(64, 64))
    found = find_samples(cfg)
    assert found.conflicts == {"s1": [str(inbox / "s1.tif"), f"{inbox / 's1'}/"]}
    assert "s1" not in [s.sample_id for s in found.samples]
    off = find_samples(IntakeConfig.from_dict({"intake_prefix": str(inbox), "output": "o", "sample_folders": False}))
    assert [s.sample_id for s in off.samples] == ["a", "b", "c", "s1"] and not off.waiting and not off.problems


def test_settle_s_completes_a_quiet_folder_without_marker(tmp_path: Path) -> None:
    inbox = _inbox(tmp_path)
    cfg = IntakeConfig.from_dict({"intake_prefix": str(inbox), "output": "o", "settle_s": 60})
    t = 1_800_000_000.0
    for f in (inbox / "s1").iterdir():
        os.utime(f, (t, t))
    os.utime(inbox / "s1" / "notes.txt", (t + 30, t + 30))  # any object counts as a change, not only images
    found = find_samples(cfg, now=t + 70)
    assert "s1" in found.waiting and "changed 40 s ago" in found.waiting["s1"] and "settle_s=60" in found.waiting["s1"]
    found = find_samples(cfg, now=t + 91)
    assert [s.uris for s in found.samples if s.sample_id == "s1"] == [(str(inbox / "s1/f1.tif"), str(inbox / "s1/f2.tif"))]


def test_manifest_lists_images_and_samples_of_several(tmp_path: Path) -> None:
    inbox = _inbox(tmp_path)
    m = tmp_path / "manifest.txt"
    m.write_text(f"# scanner export\n{inbox}/a.tif\n\nfield7: {inbox}/b.ome.tiff s3://lab/f2.tif   # two fields\n/data/z.tif\n")
    assert read_manifest(str(m)) == [f"{inbox}/a.tif", SampleSpec("field7", (f"{inbox}/b.ome.tiff", "s3://lab/f2.tif")), "/data/z.tif"]
    cfg = IntakeConfig.from_dict({"intake_prefix": str(inbox), "manifest": str(m), "output": "o", "sample_folders": False})
    found = find_samples(cfg)
    # b.ome.tiff belongs to field7, so it is not also a sample of its own; a.tif is listed twice, once
    assert [(s.sample_id, s.uris) for s in found.samples] == [
        ("a", (f"{inbox}/a.tif",)), ("c", (f"{inbox}/c.zarr",)), ("field7", (f"{inbox}/b.ome.tiff", "s3://lab/f2.tif")),
        ("z", ("/data/z.tif",))]
    for text, message in [("s3://x/a.tif s3://x/b.tif\n", "line 1: expected one URI per line, or 'ID: URI URI"),
                          ("g:\n", "sample 'g' lists no image"), ("g: /a.tif /a.tif\n", "an image twice"),
                          (".g: /a.tif\n", "line 1: expected a sample id")]:
        m.write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_manifest(str(m))


def test_intake_run_key_of_a_folder_is_the_jobs(tmp_path: Path, random_model_dir: Path) -> None:
    """Intake and job agree on "done": the poller's key equals the key the job plans the sample with."""
    inbox = tmp_path / "inbox"
    (inbox / "s1").mkdir(parents=True)
    for i, name in enumerate(("f1.tif", "f2.tif")):
        write_tiff(inbox / "s1" / name, textured_image(96, 128, seed=i))
    (inbox / "s2").mkdir()
    write_tiff(inbox / "s2" / "only.tif", textured_image(96, 96, seed=5))
    for sid in ("s1", "s2"):
        (inbox / sid / READY).write_bytes(b"")
    model, job_cfg = load_model(str(random_model_dir)), JobConfig()
    found = find_samples(IntakeConfig.from_dict({"intake_prefix": str(inbox), "output": "o"}))
    assert [s.sample_id for s in found.samples] == ["s1", "s2"]
    for s in found.samples:
        cmd = score_command(s, "job.yaml", str(tmp_path / "out"))
        spec = parse_sample_arg(cmd[cmd.index("--sample") + 1])  # what jobs.score is given
        assert spec == SampleSpec(s.sample_id, s.uris)
        plans = plan_images(spec, job_cfg, model.card, model.checksum, str(tmp_path / "out"), dry_run=True)
        assert plans is not None and {p.run_key for p in plans} == {sample_run_key(s, model.checksum, model.card, job_cfg)}
    assert not (tmp_path / "out").exists()
    s1 = found.samples[0]
    key = sample_run_key(s1, model.checksum, model.card, job_cfg)
    write_tiff(inbox / "s1" / "f3.tif", textured_image(96, 128, seed=9))  # a late image: another sample, another key
    (s1_now,) = [s for s in find_samples(IntakeConfig.from_dict({"intake_prefix": str(inbox), "output": "o"})).samples
                 if s.sample_id == "s1"]
    assert len(s1_now.uris) == 3 and sample_run_key(s1_now, model.checksum, model.card, job_cfg) != key
    assert score_command(SampleSpec("a", ("s3://in/a.tif",)), "j", "o")[-2:] == ["--uri", "s3://in/a.tif"]


def test_run_key_follows_input_model_and_config(tmp_path: Path, random_model_dir: Path, constant_model_dir: Path) -> None:
    img = write_tiff(tmp_path / "a.tif", textured_image(128, 128, seed=1))
    model, other = load_model(str(random_model_dir)), load_model(str(constant_model_dir))
    s, cfg = SampleSpec("a", (str(img),)), JobConfig()
    key = sample_run_key(s, model.checksum, model.card, cfg)
    assert key == sample_run_key(s, model.checksum, model.card, cfg.replace(cluster={"n_actors": 7}, output={"uri": "/x"}))
    assert key != sample_run_key(s, other.checksum, other.card, cfg)
    assert key != sample_run_key(s, model.checksum, model.card, cfg.replace(tiling={"stride_px": 32}))
    write_tiff(img, textured_image(128, 128, seed=2))  # same name, new content
    assert key != sample_run_key(s, model.checksum, model.card, cfg)


def test_a_samples_own_reader_is_in_its_run_key(tmp_path: Path, random_model_dir: Path) -> None:
    """A manifest's ``backend=`` keys the run as ``input.backend`` does (decoders may differ in pixels, so a
    rerun with another reader starts afresh instead of resuming blocks another decoder wrote); the key the
    poller computes is the one the job writes."""
    img = write_tiff(tmp_path / "a.tif", textured_image(128, 128, seed=1))
    model, cfg = load_model(str(random_model_dir)), JobConfig()
    auto, own = SampleSpec("a", (str(img),)), SampleSpec("a", (str(img),), backend="openslide")
    key_auto, key_own = (sample_run_key(s, model.checksum, model.card, cfg) for s in (auto, own))
    assert key_auto != key_own
    assert key_own == sample_run_key(auto, model.checksum, model.card, cfg.replace(input={"backend": "openslide"}))
    for spec, key in ((auto, key_auto), (own, key_own)):
        plans = plan_images(spec, cfg, model.card, model.checksum, str(tmp_path / "out"), dry_run=True)
        assert plans is not None and {p.run_key for p in plans} == {key}
    two = SampleSpec("b", (str(img), str(write_tiff(tmp_path / "b.tif", textured_image(96, 96, seed=2)))), backend="openslide")
    plans = plan_images(two, cfg, model.card, model.checksum, str(tmp_path / "out"), dry_run=True)
    assert plans is not None and {p.run_key for p in plans} == {sample_run_key(two, model.checksum, model.card, cfg)}
    assert sample_run_key(two, model.checksum, model.card, cfg) != sample_run_key(
        SampleSpec("b", two.uris), model.checksum, model.card, cfg)


def test_job_names_carry_run_key_and_attempt() -> None:
    key = "0123456789abcdef"
    assert job_name(key, 1) == "slidescore-0123456789abcdef-a1" and parse_job_name(job_name(key, 12)) == (key, 12)
    assert len(job_name("f" * 16, 999)) <= MAX_RAYJOB_NAME  # pipeline.run_key_for gives 16 hex digits
    with pytest.raises(ValueError, match="longer than KubeRay's 47"):
        job_name("f" * 32, 9999)
    assert parse_job_name("slidescore-score") is None and parse_job_name("raysubmit_123") is None
    with pytest.raises(ValueError):
        job_name("NOT-HEX", 1)
    with pytest.raises(ValueError):
        job_name(key, 0)


# -- decisions ------------------------------------------------------------------------------------
def _st(sid: str, key: str, *attempts: tuple[int, str], done: str | None = None, quarantined: str | None = None) -> SampleState:
    return SampleState(SampleSpec(sid, (f"s3://in/{sid}.tif",)), key, done, quarantined,
                       tuple(Attempt(job_name(key, n), n, state, f"exit 1 in {n}") for n, state in attempts))


def test_decide_skips_done_waits_for_running_and_bounds_in_flight() -> None:
    states = [_st("a", "aaaaaaaa", (1, SUCCEEDED), done="aaaaaaaa"), _st("b", "bbbbbbbb", (1, ACTIVE)),
              _st("c", "cccccccc"), _st("d", "dddddddd", (1, FAILED)), _st("e", "eeeeeeee")]
    got = {d.sample_id: (d.action, d.attempt) for d in decide(states, in_flight=1, max_in_flight=3, max_attempts=3)}
    assert got == {"a": ("done", 0), "b": ("running", 1), "c": ("submit", 1), "d": ("submit", 2), "e": ("deferred", 1)}
    got = {d.sample_id: d.action for d in decide(states, in_flight=5, max_in_flight=3, max_attempts=3)}
    assert got["c"] == got["d"] == got["e"] == "deferred"
    # the image of c was replaced while a job of its old key runs: wait, never two writers
    got = {d.sample_id: d.action for d in decide(states, in_flight=1, max_in_flight=3, max_attempts=3, busy=frozenset({"c"}))}
    assert got["c"] == "running" and got["d"] == "submit"


def test_decide_quarantines_after_max_attempts_until_the_input_changes() -> None:
    failing = _st("x", "11111111", (1, FAILED), (2, FAILED))
    (d,) = decide([failing], in_flight=0, max_in_flight=4, max_attempts=2)
    assert (d.action, d.attempt) == ("quarantine", 2) and "2 attempts failed" in d.reason and "exit 1 in 2" in d.reason
    (d,) = decide([_st("x", "11111111", (1, FAILED), (2, FAILED), quarantined="11111111")], in_flight=0, max_in_flight=4,
                  max_attempts=2)
    assert d.action == "quarantined"
    # a new file under the same name: a new run key, so attempts start over
    (d,) = decide([_st("x", "22222222", quarantined="11111111")], in_flight=0, max_in_flight=4, max_attempts=2)
    assert (d.action, d.attempt) == ("submit", 1)
    # finished outputs of another run key: reported, rescored only when asked
    changed = _st("y", "33333333", done="44444444")
    assert decide([changed], in_flight=0, max_in_flight=4, max_attempts=2)[0].action == "changed"
    assert decide([changed], in_flight=0, max_in_flight=4, max_attempts=2, rescore_changed=True)[0].action == "submit"


def test_rayjob_status_mapping() -> None:
    assert rayjob_state({})[0] == ACTIVE
    assert rayjob_state({"status": {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}})[0] == ACTIVE
    assert rayjob_state({"status": {"jobDeploymentStatus": "Retrying", "jobStatus": "FAILED"}})[0] == ACTIVE
    assert rayjob_state({"status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}})[0] == SUCCEEDED
    state, message = rayjob_state({"status": {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "message": "boom"}})
    assert state == FAILED and "boom" in message


# -- the RayJob object the poller creates ----------------------------------------------------------
@pytest.mark.parametrize("where", ["k8s/base", "k8s/overlays/example"])
def test_rayjob_from_the_template_is_schema_valid(where: str) -> None:
    (template,) = [o for o in render(REPO / where) if o["kind"] == "RayJob"]
    assert template["spec"]["suspend"] is True
    key, sample = "0123456789abcdef", SampleSpec("smear_17", ("s3://in/incoming/smear 17.tif",))
    cmd = score_command(sample, "/etc/slidescore/job.yaml", "s3://out/results")
    obj = build_rayjob(template, job_name(key, 3), sample, key, 3, cmd)
    assert crd_problems(obj) == []
    assert check_kuberay_admission([obj]) == []
    assert pod_template_problems(obj, "1.30.0") == []  # submitter, head and worker pods as core PodTemplates
    assert object_meta_problems(obj, "1.30.0") == []  # labels and annotations are valid ObjectMeta
    assert obj["metadata"]["name"] == "slidescore-0123456789abcdef-a3" and len(obj["metadata"]["name"]) <= MAX_RAYJOB_NAME
    assert obj["spec"]["suspend"] is False
    assert obj["spec"]["entrypoint"] == ("python -m jobs.score --config /etc/slidescore/job.yaml --output s3://out/results -q "
                                         "--uri 's3://in/incoming/smear 17.tif'")
    assert obj["metadata"]["labels"]["slidescore.io/run-key"] == key and obj["metadata"]["labels"]["slidescore.io/attempt"] == "3"
    assert obj["spec"]["rayClusterSpec"] == template["spec"]["rayClusterSpec"]  # the overlay's GPUs, untouched
    assert template["spec"]["suspend"] is True  # the template is not modified
    folder = SampleSpec("smear_7", ("s3://in/incoming/smear 7/f1.tif", "s3://in/incoming/smear 7/f2.tif"))
    obj = build_rayjob(template, job_name(key, 1), folder, key, 1, score_command(folder, "/etc/slidescore/job.yaml", "s3://out/r"))
    assert crd_problems(obj) == [] and object_meta_problems(obj, "1.30.0") == []
    assert obj["spec"]["entrypoint"].endswith("-q --sample 'smear_7=s3://in/incoming/smear 7/f1.tif,s3://in/incoming/smear 7/f2.tif'")
    assert obj["metadata"]["annotations"]["slidescore.io/uris"] == " ".join(folder.uris)
    bad = build_rayjob(template, job_name(key, 3), sample, key, 3, cmd)
    bad["spec"]["entrypoints"] = bad["spec"].pop("entrypoint")
    assert crd_problems(bad)  # the schema check does reject a wrong object
    with pytest.raises(ValueError, match="longer than KubeRay's 47"):
        build_rayjob(template, "slidescore-" + "a" * 40, sample, key, 1, cmd)


# -- end to end: S3 intake prefix and outputs, a real Ray head ------------------------------------
@pytest.fixture(scope="module")
def ray_head_options(s3_server: str) -> dict:
    """This module's head (tests/conftest.py ``ray_head``): unlike tests/test_job_submit.py's it has the
    S3 endpoint and credentials in its environment, as the deployed head has them from its Secret."""
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server
    return {"num_cpus": 4, "pass_aws": True}


def _jobs(head: Head) -> dict[str, dict]:
    return {j["submission_id"]: j for j in head_get(head, "/api/jobs/") if (j.get("submission_id") or "").startswith("slidescore-")}


def _job_summary(head: Head, jobs: dict[str, dict]) -> str:
    """Each job's status and message, and the tail of a failed job's log (for an assertion message)."""
    lines = []
    for sid, j in sorted(jobs.items()):
        lines.append(f"{sid}: {j['status']} {j.get('message', '')!r}")
        if j["status"] != "SUCCEEDED":
            try:
                logs = head_get(head, f"/api/jobs/{sid}/logs").get("logs", "")
            except (OSError, ValueError) as e:
                logs = f"(no logs: {e})"
            lines.append("    " + "\n    ".join(str(logs).splitlines()[-25:]))
    return "\n".join(lines)


def _wait_all(head: Head, timeout_s: float = 300) -> dict[str, dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            jobs = _jobs(head)
        except OSError:  # a busy machine can make the dashboard miss a poll
            jobs = None
        if jobs is not None and all(j["status"] in ("SUCCEEDED", "FAILED", "STOPPED") for j in jobs.values()):
            return jobs
        assert time.monotonic() < deadline, f"jobs still running after {timeout_s} s: {jobs}"
        time.sleep(2)


def _cli_poll(head: Head, config: Path) -> tuple[dict, str]:
    """One poll as the CronJob runs it: ``python -m jobs.intake`` in its own process."""
    for _ in range(3):
        p = subprocess.run([sys.executable, "-m", "jobs.intake", "--config", str(config), "--json"], env=head.env,
                           capture_output=True, text=True, timeout=300, cwd=REPO)
        # right after start the head may not yet know the node's job agent ("No available agent …")
        if p.returncode == 0 or "agent" not in p.stderr:
            break
        time.sleep(5)
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stdout


def _s3_json(fs, path: str) -> dict | None:
    """A JSON object on the S3 server, freshly read (``None`` when absent)."""
    fs.invalidate_cache()
    return json.loads(fs.cat(path)) if fs.exists(path) else None


def _s3_zarr(uri: str):
    import zarr

    store = zarr.storage.FsspecStore.from_url(uri, storage_options={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}, read_only=True)
    return zarr.open_group(store, mode="r")


def _configs(tmp_path: Path, model_dir: Path, bucket: str, **intake: object) -> Path:
    out = f"s3://{bucket}/out"
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({"model": {"name": str(model_dir)}, "tiling": {"chunk_cells": 8},
                                                       "output": {"uri": out}, "cluster": {"n_actors": 1, "num_cpus_per_actor": 0.5}}))
    intake_yaml = tmp_path / "intake.yaml"
    intake_yaml.write_text(yaml.safe_dump({"intake_prefix": f"s3://{bucket}/incoming/", "output": out, "job_config": "job.yaml",
                                           "max_in_flight": 4, "max_attempts": 2, "submit": "ray_jobs", **intake}))
    return intake_yaml


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.slow
def test_intake_end_to_end(ray_head: Head, tmp_path: Path, random_model_dir: Path, s3fs_client) -> None:
    head = ray_head
    bucket = f"intake-{os.getpid()}"
    s3fs_client.mkdir(bucket)
    for i, sid in enumerate(("a", "b", "c")):
        img = write_tiff(tmp_path / f"{sid}.tif", textured_image(160, 192, seed=i, fg_box=(16, 16, 128, 160)))
        s3fs_client.put(str(img), f"{bucket}/incoming/{sid}.tif")
    s3fs_client.pipe(f"{bucket}/incoming/readme.txt", b"not an image")
    out = f"{bucket}/out"  # the jobs write to S3; the poller reads their _SUCCESS there
    intake_yaml = _configs(tmp_path, random_model_dir, bucket, ray_address=head.url)

    # 1. one poll submits the three samples; their jobs write finished outputs to S3
    s, text = _cli_poll(head, intake_yaml)
    assert sorted(s["submitted"]) == ["a", "b", "c"] and s["in_flight"] == 3, text
    assert "intake: 3 submitted, 0 retried" in text
    jobs = _wait_all(head)
    assert sorted(jobs) == sorted(s["jobs"].values()) and all(j["status"] == "SUCCEEDED" for j in jobs.values()), \
        _job_summary(head, jobs)
    cfg = load_intake_config(intake_yaml)
    model = load_model(str(random_model_dir))
    job_cfg = load_job_config(cfg)
    assert job_cfg.output.uri == f"s3://{out}"
    for sid in ("a", "b", "c"):
        key = sample_run_key(SampleSpec(sid, (f"s3://{bucket}/incoming/{sid}.tif",)), model.checksum, model.card, job_cfg)
        assert _s3_json(s3fs_client, f"{out}/{sid}/_SUCCESS")["run_key"] == key  # type: ignore[index]  # the job computed the poller's key
        assert s["jobs"][sid] == job_name(key, 1)
        level0 = _s3_zarr(f"s3://{out}/{sid}/probabilities.ome.zarr")["0"]
        assert level0.shape == (1, 10, 12) and np.isfinite(level0[:]).any()
        assert jobs[s["jobs"][sid]]["metadata"]["slidescore_sample_id"] == sid
    assert not any(p.endswith("_SUCCESS") for p in map(str, tmp_path.rglob("*")))  # nothing finished locally

    # 2. a second poll (in this process from here on, but for the last) reads the markers on S3: nothing to do
    auth = {"Authorization": f"Bearer {head.token}"}

    def in_process_poll() -> PollSummary:
        return poll(cfg, job_cfg, RayJobsBackend(head.url, headers=auth), model_checksum=model.checksum, card=model.card)

    s2 = in_process_poll()
    assert s2.submitted == s2.retried == [] and sorted(s2.done) == ["a", "b", "c"] and s2.in_flight == 0, s2
    assert _s3_json(s3fs_client, f"{out}/_intake/last_poll.json")["done"] == s2.done  # type: ignore[index]

    # 3. a new image and a corrupt one arrive; two polls started together submit each once
    img = write_tiff(tmp_path / "d.tif", textured_image(160, 160, seed=7))
    s3fs_client.put(str(img), f"{bucket}/incoming/d.tif")
    s3fs_client.pipe(f"{bucket}/incoming/x.tif", b"II*\x00" + bytes(range(256)) * 8)
    results: list = [None, None]
    barrier = threading.Barrier(2)

    def one_poll(i: int) -> None:
        barrier.wait()
        results[i] = in_process_poll()

    threads = [threading.Thread(target=one_poll, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r is not None for r in results)
    submitted = [sid for r in results for sid in r.submitted]
    assert sorted(submitted) == ["d", "x"], [r.to_dict() for r in results]  # each by exactly one of the two polls
    for r in results:
        assert sorted(r.done) == ["a", "b", "c"]
        assert set(r.submitted) | set(r.running) | set(r.refused) == {"d", "x"}
    jobs = _wait_all(head)
    assert len(jobs) == 5 and jobs[job_name(_key(results, "d"), 1)]["status"] == "SUCCEEDED"
    assert jobs[job_name(_key(results, "x"), 1)]["status"] == "FAILED"
    assert _s3_json(s3fs_client, f"{out}/d/_SUCCESS") is not None and _s3_json(s3fs_client, f"{out}/x/_SUCCESS") is None
    # Ray refuses a submission id it has seen: a late duplicate of this attempt is not run again
    d_sample = SampleSpec("d", (f"s3://{bucket}/incoming/d.tif",))
    backend = RayJobsBackend(head.url, headers=auth)
    assert backend.submit(job_name(_key(results, "d"), 1), d_sample, _key(results, "d"), 1, ["true"]) is False

    # 4. the corrupt image is retried on the next poll, alone
    s4 = in_process_poll()
    assert s4.retried == ["x"] and s4.submitted == [] and s4.jobs["x"] == job_name(_key(results, "x"), 2), s4
    assert any(line.startswith("retry     x: ") for line in s4.lines())
    jobs = _wait_all(head)
    assert jobs[s4.jobs["x"]]["status"] == "FAILED"

    # 5. attempts used up: quarantined on S3 with the reason, and never submitted again
    s, text = _cli_poll(head, intake_yaml)
    assert s["quarantined"] == ["x"] and s["submitted"] == s["retried"] == [], text
    assert "QUARANTINED x: see _quarantine/x.json" in text
    q = _s3_json(s3fs_client, f"{out}/_quarantine/x.json")
    assert q is not None and q["run_key"] == _key(results, "x") and [a["name"][-2:] for a in q["attempts"]] == ["a1", "a2"]
    assert "2 attempts failed" in q["reason"] and "FAILED" in q["reason"] and "x.tif" in q["reason"], q["reason"]
    s6 = in_process_poll()
    assert s6.still_quarantined == ["x"] and s6.submitted == s6.retried == s6.quarantined == [], s6
    assert sorted(s6.done) == ["a", "b", "c", "d"] and len(_jobs(head)) == 6


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.slow
def test_intake_sample_folder_end_to_end(ray_head: Head, tmp_path: Path, random_model_dir: Path, s3fs_client) -> None:
    """A folder of two images is one sample, submitted once its ``_READY`` marker is there; the job
    scores both images and writes one ``_SUCCESS`` on S3 whose key the poller computed."""
    head = ray_head
    bucket = f"folders-{os.getpid()}"
    s3fs_client.mkdir(bucket)
    for i, name in enumerate(("field1.tif", "field2.tif")):
        img = write_tiff(tmp_path / name, textured_image(128, 160, seed=10 + i, fg_box=(16, 16, 96, 128)))
        s3fs_client.put(str(img), f"{bucket}/incoming/smear 7/{name}")
    out = f"{bucket}/out"
    # the job runs this checkout's code (uploaded working dir), as a RayCluster deployment would run the image's
    intake_yaml = _configs(tmp_path, random_model_dir, bucket, ray_address=head.url, working_dir=str(REPO))
    cfg = load_intake_config(intake_yaml)
    model = load_model(str(random_model_dir))
    job_cfg = load_job_config(cfg)

    def in_process_poll() -> PollSummary:
        backend = RayJobsBackend(head.url, cfg.working_dir, headers={"Authorization": f"Bearer {head.token}"})
        return poll(cfg, job_cfg, backend, model_checksum=model.checksum, card=model.card)

    before = set(_jobs(head))
    s1 = in_process_poll()  # uploaded, but not marked complete: nothing is submitted
    assert s1.submitted == [] and list(s1.waiting) == ["smear_7"] and f"has no {READY} marker" in s1.waiting["smear_7"], s1
    s3fs_client.pipe(f"{bucket}/incoming/smear 7/{READY}", b"")
    s, text = _cli_poll(head, intake_yaml)
    assert s["submitted"] == ["smear_7"] and s["waiting"] == {}, text
    jobs = {k: v for k, v in _wait_all(head).items() if k not in before}
    job = jobs[s["jobs"]["smear_7"]]
    assert list(jobs) == [s["jobs"]["smear_7"]] and job["status"] == "SUCCEEDED", job.get("message")
    uris = tuple(f"s3://{bucket}/incoming/smear 7/field{i}.tif" for i in (1, 2))
    assert jobs[s["jobs"]["smear_7"]]["entrypoint"].endswith(f"--sample 'smear_7={','.join(uris)}'")
    key = sample_run_key(SampleSpec("smear_7", uris), model.checksum, model.card, job_cfg)
    assert s["jobs"]["smear_7"] == job_name(key, 1)
    assert _s3_json(s3fs_client, f"{out}/smear_7/_SUCCESS")["run_key"] == key  # type: ignore[index]
    run = _s3_json(s3fs_client, f"{out}/smear_7/run.json")
    assert run is not None and run["input"]["images"] == list(uris) and run["sample_id"] == "smear_7", run
    for iid in ("field1", "field2"):
        level0 = _s3_zarr(f"s3://{out}/smear_7/images/{iid}/probabilities.ome.zarr")["0"]
        assert level0.shape == (1, 8, 10) and np.isfinite(level0[:]).any()
    s3 = in_process_poll()  # done: the marker's key is the folder's
    assert s3.done == ["smear_7"] and s3.submitted == s3.retried == [] and not s3.waiting, s3


def _key(results: list, sid: str) -> str:
    for r in results:
        if sid in r.jobs:
            parsed = parse_job_name(r.jobs[sid])
            assert parsed is not None
            return parsed[0]
    raise AssertionError(f"{sid} was not submitted")


# -- submit: rayjob against a loopback stand-in for the Kubernetes API (no cluster here) -----------
class _FakeKubeApi:
    """Enough of the API server for RayJobs in one namespace: list (label selector), get, create
    (409 on a duplicate name), with bearer-token checks. Objects are kept as posted."""

    def __init__(self, template: dict) -> None:
        import http.server

        self.objects: dict[str, dict] = {"slidescore-score": template}
        self.requests: list[tuple[str, str]] = []
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self) -> str | None:
                api.requests.append((self.command, self.path))
                if self.headers.get("Authorization") != "Bearer sa-token":
                    self._reply(401, {"kind": "Status", "code": 401})
                    return None
                base = "/apis/ray.io/v1/namespaces/imaging/rayjobs"
                if not self.path.startswith(base):
                    self._reply(404, {"kind": "Status", "code": 404})
                    return None
                return self.path[len(base):]

            def do_GET(self) -> None:  # noqa: N802
                rest = self._route()
                if rest is None:
                    return
                if rest.startswith("?labelSelector=slidescore.io/run-key"):
                    items = [o for o in api.objects.values() if "slidescore.io/run-key" in o["metadata"].get("labels", {})]
                    self._reply(200, {"kind": "RayJobList", "items": items})
                elif rest.lstrip("/") in api.objects:
                    self._reply(200, api.objects[rest.lstrip("/")])
                else:
                    self._reply(404, {"kind": "Status", "code": 404})

            def do_POST(self) -> None:  # noqa: N802
                if self._route() is None:
                    return
                obj = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                name = obj["metadata"]["name"]
                if name in api.objects:
                    self._reply(409, {"kind": "Status", "reason": "AlreadyExists", "code": 409})
                    return
                api.objects[name] = obj
                self._reply(201, obj)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def set_status(self, name: str, deployment: str, job: str, message: str = "") -> None:
        self.objects[name]["status"] = {"jobDeploymentStatus": deployment, "jobStatus": job, "message": message}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_rayjob_backend_polls_submit_retry_quarantine(tmp_path: Path, random_model_dir: Path) -> None:
    from slidescore.intake import RayJobBackend, load_job_config

    (template,) = [o for o in render(REPO / "k8s/overlays/example") if o["kind"] == "RayJob"]
    api = _FakeKubeApi(template)
    try:
        inbox, out = tmp_path / "inbox", tmp_path / "out"
        inbox.mkdir()
        for i, sid in enumerate(("a", "b", "c")):
            write_tiff(inbox / f"{sid}.tif", textured_image(96, 96, seed=i))
        (tmp_path / "job.yaml").write_text(yaml.safe_dump({"model": {"name": str(random_model_dir)}}))
        cfg = IntakeConfig.from_dict({"intake_prefix": str(inbox), "output": str(out), "max_in_flight": 2, "max_attempts": 2,
                                      "namespace": "imaging"}, base_dir=tmp_path)
        job_cfg, model = load_job_config(cfg), load_model(str(random_model_dir))

        def run() -> PollSummary:
            backend = RayJobBackend(cfg.namespace, cfg.rayjob_template, api_url=api.url, token="sa-token")
            return poll(cfg, job_cfg, backend, model_checksum=model.checksum, card=model.card)

        s = run()
        assert s.submitted == ["a", "b"] and s.deferred == ["c"] and s.in_flight == 2  # max_in_flight
        for sid in ("a", "b"):
            obj = api.objects[s.jobs[sid]]
            assert crd_problems(obj) == [] and check_kuberay_admission([obj]) == []
            assert obj["spec"]["suspend"] is False and f"--uri {inbox / sid}.tif" in obj["spec"]["entrypoint"]
            assert obj["metadata"]["annotations"]["slidescore.io/sample-id"] == sid
        assert api.objects["slidescore-score"]["spec"]["suspend"] is True
        first = dict(s.jobs)
        s = run()  # nothing finished: no slot free, nothing new
        assert s.submitted == [] and sorted(s.running) == ["a", "b"] and s.deferred == ["c"]
        # a succeeds (its job writes the marker), b fails: c takes a slot, b is retried
        api.set_status(first["a"], "Complete", "SUCCEEDED")
        key_a = parse_job_name(first["a"])[0]  # type: ignore[index]
        (out / "a").mkdir(parents=True)
        (out / "a" / "_SUCCESS").write_text(json.dumps({"run_key": key_a}))
        api.set_status(first["b"], "Failed", "FAILED", "job b failed: UnsupportedImageError")
        s = run()
        assert s.done == ["a"] and s.retried == ["b"] and s.submitted == ["c"] and s.jobs["b"].endswith("-a2")
        api.set_status(s.jobs["b"], "Failed", "FAILED", "again: UnsupportedImageError")
        # a poll that overlapped and tries the same attempt again is refused by the API (409)
        backend = RayJobBackend(cfg.namespace, cfg.rayjob_template, api_url=api.url, token="sa-token")
        assert backend.submit(s.jobs["c"], SampleSpec("c", (str(inbox / "c.tif"),)), parse_job_name(s.jobs["c"])[0], 1,  # type: ignore[index]
                              ["true"]) is False
        s = run()
        assert s.quarantined == ["b"] and s.running == ["c"] and s.submitted == s.retried == []
        q = json.loads((out / "_quarantine" / "b.json").read_text())
        assert "again: UnsupportedImageError" in q["reason"] and len(q["attempts"]) == 2
        s = run()
        assert s.still_quarantined == ["b"] and s.quarantined == [] and s.submitted == s.retried == []
        assert json.loads((out / "_intake" / "last_poll.json").read_text())["still_quarantined"] == ["b"]
        assert all(method in ("GET", "POST") for method, _ in api.requests)  # never deletes or patches
    finally:
        api.close()


# -- batches: several samples per job, attempts per sample -----------------------------------------
def test_batches_group_in_order_and_keep_overwrite_apart() -> None:
    from slidescore.intake.backends import Member, batch_key, decode_members, encode_members
    from slidescore.intake.poll import batch_command, batches

    ms = [Member(SampleSpec(sid, (f"/in/{sid}.tif",)), f"{i:016x}", 1 + (sid == "b")) for i, sid in enumerate("abcde")]
    flags = [False, True, False, False, True]
    got = batches(list(zip(ms, flags, strict=True)), 2)
    assert [([m.sample.sample_id for m in b], o) for b, o in got] == [(["a", "c"], False), (["d"], False), (["b", "e"], True)]
    assert batches(list(zip(ms, flags, strict=True)), 1) == [([m], o) for m, o in zip(ms, flags, strict=True) if not o] + \
        [([m], o) for m, o in zip(ms, flags, strict=True) if o]
    cmd = batch_command([ms[0].sample, SampleSpec("f", ("/in/x.tif", "/in/y.tif"))], "job.yaml", "s3://out", overwrite=True)
    assert cmd == ["python", "-m", "jobs.score", "--config", "job.yaml", "--output", "s3://out", "-q", "--uri", "/in/a.tif",
                   "--sample", "f=/in/x.tif,/in/y.tif", "--overwrite"]
    assert cmd[:-1] == score_command(ms[0].sample, "job.yaml", "s3://out")[:-2] + ["--uri", "/in/a.tif", "--sample", "f=/in/x.tif,/in/y.tif"]
    assert decode_members(encode_members(ms)) == [(m.run_key, m.attempt, m.sample.sample_id) for m in ms]
    assert decode_members("bad k:x:y k:2: :1:z") == []
    assert batch_key(ms[:2]) == batch_key(ms[1::-1]) != batch_key([ms[0], ms[1]._replace(attempt=3)])
    with pytest.raises(ConfigError, match="batch_size: expected a positive integer"):
        IntakeConfig.from_dict({"intake_prefix": "p", "output": "o", "batch_size": 0})


def test_rayjob_batches_retry_and_quarantine_per_sample(tmp_path: Path, random_model_dir: Path) -> None:
    """batch_size 2: one RayJob per two samples; a batch that failed for one of them retries only that
    one (with a new sample in the same job); the rest is done."""
    from slidescore.intake import RayJobBackend
    from slidescore.intake.backends import ANNOTATION_MEMBERS, decode_members

    (template,) = [o for o in render(REPO / "k8s/overlays/example") if o["kind"] == "RayJob"]
    api = _FakeKubeApi(template)
    try:
        inbox, out = tmp_path / "inbox", tmp_path / "out"
        inbox.mkdir()
        for i, sid in enumerate("abcde"):
            write_tiff(inbox / f"{sid}.tif", textured_image(96, 96, seed=i))
        (tmp_path / "job.yaml").write_text(yaml.safe_dump({"model": {"name": str(random_model_dir)}}))
        cfg = IntakeConfig.from_dict({"intake_prefix": str(inbox), "output": str(out), "max_in_flight": 2, "max_attempts": 2,
                                      "namespace": "imaging", "batch_size": 2}, base_dir=tmp_path)
        job_cfg, model = load_job_config(cfg), load_model(str(random_model_dir))
        keys = {sid: sample_run_key(SampleSpec(sid, (str(inbox / f"{sid}.tif"),)), model.checksum, model.card, job_cfg)
                for sid in "abcde"}

        def run() -> PollSummary:
            backend = RayJobBackend(cfg.namespace, cfg.rayjob_template, api_url=api.url, token="sa-token")
            return poll(cfg, job_cfg, backend, model_checksum=model.checksum, card=model.card)

        def finish(*sids: str) -> None:  # what a job does for each sample it scored
            for sid in sids:
                (out / sid).mkdir(parents=True, exist_ok=True)
                (out / sid / "_SUCCESS").write_text(json.dumps({"run_key": keys[sid]}))

        s = run()
        assert s.submitted == ["a", "b", "c", "d"] and s.deferred == ["e"] and s.in_flight == 2  # two jobs of two
        ab, cd = s.jobs["a"], s.jobs["c"]
        assert s.jobs["b"] == ab != cd == s.jobs["d"] and ab.endswith("-a1") and len(ab) <= MAX_RAYJOB_NAME
        obj = api.objects[ab]
        assert crd_problems(obj) == [] and check_kuberay_admission([obj]) == []
        assert f"--uri {inbox / 'a'}.tif --uri {inbox / 'b'}.tif" in obj["spec"]["entrypoint"]
        assert decode_members(obj["metadata"]["annotations"][ANNOTATION_MEMBERS]) == [(keys["a"], 1, "a"), (keys["b"], 1, "b")]
        assert run().submitted == []  # both slots busy: nothing new, nothing twice
        # the first batch fails (b was bad, a finished), the second succeeds
        finish("a", "c", "d")
        api.set_status(ab, "Failed", "FAILED", "1 sample(s) failed")
        api.set_status(cd, "Complete", "SUCCEEDED")
        s = run()
        assert sorted(s.done) == ["a", "c", "d"] and s.retried == ["b"] and s.submitted == ["e"] and s.in_flight == 1
        be = s.jobs["b"]
        assert s.jobs["e"] == be and be.endswith("-a2")  # b's second attempt shares a job with e's first
        assert decode_members(api.objects[be]["metadata"]["annotations"][ANNOTATION_MEMBERS]) == [(keys["b"], 2, "b"), (keys["e"], 1, "e")]
        finish("e")
        api.set_status(be, "Failed", "FAILED", "b failed again")
        s = run()
        assert s.quarantined == ["b"] and sorted(s.done) == ["a", "c", "d", "e"] and s.submitted == s.retried == []
        assert len(json.loads((out / "_quarantine" / "b.json").read_text())["attempts"]) == 2
    finally:
        api.close()
