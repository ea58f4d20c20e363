"""Offline validation of the Kubernetes manifests under k8s/ (no cluster, no kubectl needed).

Every kustomization is rendered by ``kustomize_lite`` and then checked three ways (see
``k8s_checks``): core kinds and all pod templates with kubernetes-validate in strict mode, RayCluster
/ RayJob against the KubeRay CRD schemas closed to unknown fields, and explicit rules that no
schema expresses. The negative tests at the end prove each validator rejects the mistake it is
there for.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from k8s_checks import (
    CHECKS,
    GPU_RESOURCE,
    check_cronjobs,
    check_gpus,
    check_no_inline_secrets,
    check_ray_version,
    check_rbac,
    check_resources,
    check_security,
    check_submission_mode,
    core_problems,
    crd_problems,
    object_meta_problems,
    pod_template_problems,
    pod_templates,
)
from kustomize_lite import UnsupportedKustomization, render, split_image

from slidescore.config import JobConfig

REPO = Path(__file__).resolve().parents[2]
KUSTOMIZATIONS = ["k8s/base", "k8s/overlays/example"]
# Oldest Kubernetes the manifests target (CronJob timeZone is GA since 1.27) and the newest that
# kubernetes-validate 1.37 ships schemas for.
K8S_VERSIONS = ["1.30.0", "1.37.0"]
RAY_KINDS = ("RayCluster", "RayJob")
# The pinned Ray of the environment: a Ray bump that forgets rayVersion / image tags fails here.
RAY_VERSION = ray.__version__

JOB_CONFIG_SHAPE = {
    "model": {"name", "device", "batch_size"},
    "tiling": {"stride_px", "chunk_cells", "block_chunks"},
    "blending": {"weights"},
    "mask": {"method", "min_foreground_frac"},
    "regions": {"min_area_um2", "top_k"},
    "output": {"uri"},
}
INTAKE_CONFIG_KEYS = {"intake_prefix", "output", "max_in_flight", "max_attempts", "submit"}

Manifest = dict[str, Any]


def by_kind(objects: list[Manifest], kind: str) -> list[Manifest]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[Manifest], kind: str) -> Manifest:
    (found,) = by_kind(objects, kind)
    return found


@pytest.fixture(scope="module", params=KUSTOMIZATIONS)
def rendered(request: pytest.FixtureRequest) -> list[Manifest]:
    return render(REPO / request.param)


@pytest.fixture(scope="module")
def base() -> list[Manifest]:
    return render(REPO / "k8s/base")


@pytest.fixture
def mutable(base: list[Manifest]) -> list[Manifest]:
    return copy.deepcopy(base)


# --- rendering --------------------------------------------------------------------------------


def test_kustomization_renders_every_component(rendered: list[Manifest]) -> None:
    kinds = sorted(o["kind"] for o in rendered)
    expected = [
        "ConfigMap",
        "CronJob",
        "RayCluster",
        "RayJob",
        "Role",
        "RoleBinding",
        "ServiceAccount",
        "ServiceAccount",
    ]
    assert [k for k in kinds if k != "Namespace"] == expected


@pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl not on PATH (optional cross-check)"
)
@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_resolver_matches_kubectl_kustomize(directory: str) -> None:
    def key(o: Manifest) -> tuple[str, ...]:
        return (
            o["apiVersion"],
            o["kind"],
            o["metadata"].get("namespace", ""),
            o["metadata"]["name"],
        )

    output = subprocess.run(
        ["kubectl", "kustomize", str(REPO / directory)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    expected = sorted((d for d in yaml.safe_load_all(output) if d), key=key)
    assert sorted(render(REPO / directory), key=key) == expected


# --- schemas ----------------------------------------------------------------------------------


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_core_kinds_are_valid_in_strict_mode(rendered: list[Manifest], k8s_version: str) -> None:
    core = [o for o in rendered if o["kind"] not in RAY_KINDS]
    assert core
    assert [p for o in core for p in core_problems(o, k8s_version)] == []


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_pod_templates_are_valid_core_pod_templates(
    rendered: list[Manifest], k8s_version: str
) -> None:
    templates = [where for o in rendered for where, _ in pod_templates(o)]
    # head + worker of the RayCluster, head + worker + submitter of the RayJob, the CronJob's pod.
    assert len(templates) == 6
    assert [p for o in rendered for p in pod_template_problems(o, k8s_version)] == []


def test_ray_resources_are_valid_against_kuberay_crds(rendered: list[Manifest]) -> None:
    ray_objects = [o for o in rendered if o["kind"] in RAY_KINDS]
    assert sorted(o["kind"] for o in ray_objects) == ["RayCluster", "RayJob"]
    problems = [p for o in ray_objects for p in crd_problems(o)]
    problems += [p for o in ray_objects for p in object_meta_problems(o, K8S_VERSIONS[-1])]
    assert problems == []


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__)
def test_explicit_checks_pass(rendered: list[Manifest], check: Any) -> None:
    assert check(rendered) == []


def test_ray_version_and_image_tags_match_installed_ray(rendered: list[Manifest]) -> None:
    assert RAY_VERSION == "2.60.0"
    assert check_ray_version(rendered, RAY_VERSION) == []


# --- what the project needs from the manifests ----------------------------------------------------


def test_rayjob_is_a_suspended_one_off_scoring_template(base: list[Manifest]) -> None:
    spec = one(base, "RayJob")["spec"]
    assert spec["entrypoint"] == "python -m jobs.score --config /etc/slidescore/job.yaml"
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["suspend"] is True  # applying the kustomization must not start a GPU cluster
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["backoffLimit"] >= 0
    head = spec["rayClusterSpec"]["headGroupSpec"]
    mounts = {m["mountPath"] for m in head["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert "/etc/slidescore" in mounts  # the entrypoint runs on the head and reads the config there


@pytest.mark.parametrize("kind", RAY_KINDS)
def test_ray_clusters_have_the_same_shape(base: list[Manifest], kind: str) -> None:
    obj = one(base, kind)
    cluster = obj["spec"] if kind == "RayCluster" else obj["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"] == {
        "num-cpus": "0",
        "dashboard-host": "0.0.0.0",
    }
    assert cluster["authOptions"] == {"mode": "token"}
    (workers,) = cluster["workerGroupSpecs"]
    assert {"replicas", "minReplicas", "maxReplicas"} <= set(workers)
    worker = workers["template"]["spec"]
    assert worker["nodeSelector"]
    assert {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"} in worker[
        "tolerations"
    ]


def test_rayjob_cluster_mirrors_the_raycluster(rendered: list[Manifest]) -> None:
    # Same head and worker pods in both; only the worker replica counts may differ.
    interactive = one(rendered, "RayCluster")["spec"]
    one_off = one(rendered, "RayJob")["spec"]["rayClusterSpec"]

    def shape(cluster: Manifest) -> Manifest:
        workers = [
            {k: v for k, v in group.items() if k not in ("replicas", "minReplicas", "maxReplicas")}
            for group in cluster["workerGroupSpecs"]
        ]
        return {**cluster, "workerGroupSpecs": workers}

    assert shape(one_off) == shape(interactive)


def test_cronjob_runs_the_intake_poller(base: list[Manifest]) -> None:
    cron = one(base, "CronJob")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["command"] == [
        "python",
        "-m",
        "jobs.intake",
        "--config",
        "/etc/slidescore/intake.yaml",
    ]
    assert pod["serviceAccountName"] == "slidescore-intake"
    assert pod["restartPolicy"] == "Never"


def test_poller_role_grants_exactly_rayjob_access(base: list[Manifest]) -> None:
    grants = {
        (group, resource, verb)
        for rule in one(base, "Role")["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert grants == {
        ("ray.io", "rayjobs", "create"),
        ("ray.io", "rayjobs", "get"),
        ("ray.io", "rayjobs", "list"),
        ("ray.io", "rayjobs", "watch"),
        ("ray.io", "rayjobs/status", "get"),
    }
    binding = one(base, "RoleBinding")
    assert [s["name"] for s in binding["subjects"]] == ["slidescore-intake"]


def test_config_map_holds_job_and_intake_configs(rendered: list[Manifest]) -> None:
    data = one(rendered, "ConfigMap")["data"]
    job = yaml.safe_load(data["job.yaml"])
    assert {section: set(values) for section, values in job.items()} == JOB_CONFIG_SHAPE
    # The engine's own loader (unknown keys rejected) accepts what the pods will read.
    assert JobConfig.from_dict(job).output.uri == job["output"]["uri"]
    intake = yaml.safe_load(data["intake.yaml"])
    assert set(intake) == INTAKE_CONFIG_KEYS
    assert intake["submit"] == "rayjob"
    assert intake["output"] == job["output"]["uri"]
    assert intake["intake_prefix"].startswith("s3://") and intake["intake_prefix"].endswith("/")


def test_s3_credentials_come_only_from_the_secret(rendered: list[Manifest]) -> None:
    refs = {
        env["secretRef"]["name"]
        for o in rendered
        for _, template in pod_templates(o)
        for container in template["spec"]["containers"]
        for env in container.get("envFrom", [])
    }
    assert refs == {"slidescore-s3"}
    assert by_kind(rendered, "Secret") == []


def test_example_overlay_sets_namespace_image_and_gpu_shape() -> None:
    objects = render(REPO / "k8s/overlays/example")
    assert one(objects, "Namespace")["metadata"]["name"] == "slidescore"
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {
        "slidescore"
    }
    images = {
        c["image"] for o in objects for _, t in pod_templates(o) for c in t["spec"]["containers"]
    }
    assert images == {f"registry.example.com/imaging/slidescore:0.1.0-ray{RAY_VERSION}"}
    for obj in by_kind(objects, "RayCluster") + by_kind(objects, "RayJob"):
        cluster = obj["spec"] if obj["kind"] == "RayCluster" else obj["spec"]["rayClusterSpec"]
        worker = cluster["workerGroupSpecs"][0]["template"]["spec"]
        assert worker["containers"][0]["resources"]["limits"][GPU_RESOURCE] == "2"
        assert worker["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}
    config = yaml.safe_load(one(objects, "ConfigMap")["data"]["job.yaml"])
    assert config["output"]["uri"].startswith("s3://example-")


# --- the validators catch what they are there for -----------------------------------------------------


def _worker_container(objects: list[Manifest], kind: str) -> Manifest:
    obj = one(objects, kind)
    cluster = obj["spec"] if kind == "RayCluster" else obj["spec"]["rayClusterSpec"]
    return cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


def test_crd_schema_rejects_a_misspelled_rayjob_field(mutable: list[Manifest]) -> None:
    rayjob = one(mutable, "RayJob")
    rayjob["spec"]["shutdownAfterJobFinish"] = rayjob["spec"].pop("shutdownAfterJobFinishes")
    problems = crd_problems(rayjob)
    assert any("shutdownAfterJobFinish'" in p and "not allowed" in p for p in problems), problems


def test_crd_schema_rejects_a_misspelled_field_deep_in_a_pod_template(
    mutable: list[Manifest],
) -> None:
    container = _worker_container(mutable, "RayJob")
    container["imagePullPolcy"] = container.pop("imagePullPolicy")
    rayjob = one(mutable, "RayJob")
    assert any("imagePullPolcy" in p for p in crd_problems(rayjob))
    assert any("imagePullPolcy" in p for p in pod_template_problems(rayjob, K8S_VERSIONS[-1]))


def test_crd_schema_rejects_duplicate_list_map_keys(mutable: list[Manifest]) -> None:
    container = _worker_container(mutable, "RayCluster")
    container["env"].append(copy.deepcopy(container["env"][0]))
    assert any("duplicate entry" in p for p in crd_problems(one(mutable, "RayCluster")))


def test_crd_schema_refuses_fields_guarded_only_by_cel(mutable: list[Manifest]) -> None:
    rayjob = one(mutable, "RayJob")
    rayjob["spec"]["deletionStrategy"] = {"onSuccess": {"policy": "DeleteCluster"}}
    assert any("CEL" in p for p in crd_problems(rayjob))


def test_wrong_submission_mode_passes_the_crd_but_is_rejected(mutable: list[Manifest]) -> None:
    rayjob = one(mutable, "RayJob")
    rayjob["spec"]["submissionMode"] = "K8sJob"
    assert crd_problems(rayjob) == []  # the CRD keeps submissionMode a free string
    assert check_submission_mode(mutable) != []


def test_lowercase_concurrency_policy_passes_the_schema_but_is_rejected(
    mutable: list[Manifest],
) -> None:
    cron = one(mutable, "CronJob")
    cron["spec"]["concurrencyPolicy"] = "forbid"
    assert core_problems(cron, K8S_VERSIONS[-1]) == []  # the OpenAPI schema has no enum here
    problems = check_cronjobs(mutable)
    assert any("'forbid'" in p and "not even a valid value" in p for p in problems), problems


@pytest.mark.parametrize("quantity", ["one", "0.5", "0", "-1", 1.5])
def test_gpu_quantity_that_is_not_a_positive_integer_is_rejected(
    mutable: list[Manifest], quantity: Any
) -> None:
    container = _worker_container(mutable, "RayCluster")
    container["resources"]["limits"][GPU_RESOURCE] = quantity
    container["resources"]["requests"][GPU_RESOURCE] = quantity
    problems = check_gpus(mutable)
    assert any(f"limits.{GPU_RESOURCE}" in p for p in problems), problems
    if quantity == "one":
        # The core PodTemplate schema takes any string as a quantity; the CRD has a pattern.
        assert pod_template_problems(one(mutable, "RayCluster"), K8S_VERSIONS[-1]) == []
        assert crd_problems(one(mutable, "RayCluster")) != []


def test_gpu_in_limits_only_is_rejected(mutable: list[Manifest]) -> None:
    del _worker_container(mutable, "RayJob")["resources"]["requests"][GPU_RESOURCE]
    assert any("requests" in p for p in check_gpus(mutable))


@pytest.mark.parametrize("field", ["verbs", "resources", "apiGroups"])
def test_role_with_a_wildcard_is_rejected(mutable: list[Manifest], field: str) -> None:
    one(mutable, "Role")["rules"][0][field] = ["*"]
    assert any("wildcards" in p for p in check_rbac(mutable))


def test_role_reading_secrets_is_rejected(mutable: list[Manifest]) -> None:
    one(mutable, "Role")["rules"].append(
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}
    )
    assert any("secrets" in p for p in check_rbac(mutable))


def test_inline_aws_secret_is_rejected(mutable: list[Manifest]) -> None:
    pod = one(mutable, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    pod["containers"][0]["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "not-a-real-key"})
    assert any("inline value" in p for p in check_no_inline_secrets(mutable))


def test_aws_credentials_pasted_into_a_config_are_rejected(mutable: list[Manifest]) -> None:
    one(mutable, "ConfigMap")["data"]["job.yaml"] += "aws_secret_access_key: not-a-real-key\n"
    assert any("inline AWS credential" in p for p in check_no_inline_secrets(mutable))


def test_container_without_resources_is_rejected(mutable: list[Manifest]) -> None:
    del one(mutable, "RayJob")["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["resources"]
    assert check_resources(mutable) != []


def test_writable_root_filesystem_is_rejected(mutable: list[Manifest]) -> None:
    context = _worker_container(mutable, "RayCluster")["securityContext"]
    context["readOnlyRootFilesystem"] = False
    assert any("readOnlyRootFilesystem" in p for p in check_security(mutable))


def test_ray_version_drift_is_rejected(mutable: list[Manifest]) -> None:
    one(mutable, "RayCluster")["spec"]["rayVersion"] = "2.59.0"
    container = _worker_container(mutable, "RayJob")
    name, _, _ = split_image(container["image"])
    container["image"] = f"{name}:0.1.0"
    problems = check_ray_version(mutable, RAY_VERSION)
    assert any("rayVersion '2.59.0'" in p for p in problems)
    assert any("0.1.0'" in p and "tag does not carry" in p for p in problems)


def test_resolver_refuses_kustomize_features_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {team: x}\n")
    with pytest.raises(UnsupportedKustomization, match="commonLabels"):
        render(tmp_path)


def test_kubernetes_validate_is_strict() -> None:
    # Guards the premise of the core checks: strict mode rejects unknown fields.
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "dta": {}}
    assert core_problems(config_map, K8S_VERSIONS[-1]) != []
