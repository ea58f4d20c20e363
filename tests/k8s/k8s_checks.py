"""Offline validators for rendered Kubernetes manifests: schemas plus the rules schemas miss.

Three layers, each returning a list of human-readable problems (empty means valid):

- ``core_problems``: core kinds with kubernetes-validate in strict mode (unknown fields rejected),
  and ``pod_template_problems`` for the pod templates embedded in RayCluster / RayJob, validated
  as core ``PodTemplate`` objects.
- ``crd_problems``: RayCluster / RayJob against the KubeRay CRD ``openAPIV3Schema`` kept in
  tests/data/k8s, closed to unknown fields, with list-map keys enforced and CEL-guarded fields
  refused (CEL cannot be evaluated offline).
- ``CHECKS``: rules no schema expresses (free-string enums, GPU quantities, security context,
  RBAC, secrets, references between objects, KubeRay's own admission rules).
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
from kustomize_lite import split_image

Manifest = dict[str, Any]
DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "k8s"
CRD_SCHEMA_FILES = {
    "RayCluster": "raycluster.ray.io-v1.schema.json",
    "RayJob": "rayjob.ray.io-v1.schema.json",
}
# KubeRay ray-operator/apis/ray/v1/rayjob_types.go (JobSubmissionMode); the CRD keeps a free string.
SUBMISSION_MODES = frozenset({"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"})
CONCURRENCY_POLICIES = frozenset({"Allow", "Forbid", "Replace"})
GPU_RESOURCE = "nvidia.com/gpu"
S3_SECRET_NAME = "slidescore-s3"
SECRET_ENV_NAMES = frozenset({"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"})
# KubeRay utils/constant.go: MaxRayClusterNameLength (63 - len("-serve-svc")) / MaxRayJobNameLength.
MAX_NAME_LENGTH = {"RayCluster": 53, "RayJob": 47}
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
SECRET_ASSIGNMENT = re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*\S")


def ref(obj: Manifest) -> str:
    meta = obj.get("metadata", {})
    return f"{obj.get('kind')}/{meta.get('name')}"


# --- where pods come from -------------------------------------------------------------------------


def ray_cluster_specs(obj: Manifest) -> list[tuple[str, Manifest]]:
    """(where, RayClusterSpec) of a RayCluster or of a RayJob's own cluster."""
    if obj.get("kind") == "RayCluster":
        return [(f"{ref(obj)} spec", obj.get("spec", {}))]
    if obj.get("kind") == "RayJob" and "rayClusterSpec" in obj.get("spec", {}):
        return [(f"{ref(obj)} spec.rayClusterSpec", obj["spec"]["rayClusterSpec"])]
    return []


def pod_templates(obj: Manifest) -> list[tuple[str, Manifest]]:
    """(where, PodTemplateSpec) for every pod template an object creates pods from."""
    found = []
    for where, spec in ray_cluster_specs(obj):
        found.append(
            (f"{where}.headGroupSpec.template", spec.get("headGroupSpec", {}).get("template", {}))
        )
        for i, group in enumerate(spec.get("workerGroupSpecs", [])):
            found.append((f"{where}.workerGroupSpecs[{i}].template", group.get("template", {})))
    if obj.get("kind") == "RayJob" and "submitterPodTemplate" in obj.get("spec", {}):
        found.append((f"{ref(obj)} spec.submitterPodTemplate", obj["spec"]["submitterPodTemplate"]))
    if obj.get("kind") == "CronJob":
        template = obj.get("spec", {}).get("jobTemplate", {}).get("spec", {}).get("template", {})
        found.append((f"{ref(obj)} spec.jobTemplate.spec.template", template))
    if obj.get("kind") in ("Job", "Deployment", "StatefulSet", "DaemonSet", "Pod", "PodTemplate"):
        raise NotImplementedError(f"{ref(obj)}: teach pod_templates() where its pods come from")
    return found


def containers(template: Manifest) -> Iterator[tuple[str, Manifest]]:
    spec = template.get("spec", {})
    for field in ("initContainers", "containers"):
        for container in spec.get(field, []):
            yield f"{field}[{container.get('name')}]", container


# --- schema validation ----------------------------------------------------------------------------


def core_problems(obj: Manifest, k8s_version: str) -> list[str]:
    try:
        kubernetes_validate.validate(obj, k8s_version, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(p) for p in error.path)
        return [f"{ref(obj)} (Kubernetes {error.version} strict) {path}: {error.message}"]
    return []


def pod_template_problems(obj: Manifest, k8s_version: str) -> list[str]:
    problems = []
    for where, template in pod_templates(obj):
        wrapper = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": "check"},
            "template": template,
        }
        problems += [f"{where}: {p}" for p in core_problems(wrapper, k8s_version)]
    return problems


def object_meta_problems(obj: Manifest, k8s_version: str) -> list[str]:
    """Custom resources' metadata is `type: object` in CRDs: check it as a core ObjectMeta."""
    wrapper = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata", {})}
    return [
        p.replace("ConfigMap/", f"{obj.get('kind')}/", 1)
        for p in core_problems(wrapper, k8s_version)
    ]


def close_schema(node: Any) -> None:
    """Reject unknown fields: additionalProperties false wherever the API server would prune."""
    if isinstance(node, list):
        for item in node:
            close_schema(item)
        return
    if not isinstance(node, dict):
        return
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        node.setdefault("additionalProperties", False)
    for key, value in node.items():
        if key == "properties":
            for sub_schema in value.values():
                close_schema(sub_schema)
        elif key not in (
            "enum",
            "default",
            "required",
            "x-kubernetes-validations",
            "x-kubernetes-list-map-keys",
        ):
            close_schema(value)


def _list_map_keys(
    validator: Any, keys: list[str], instance: Any, schema: Manifest
) -> Iterator[Any]:
    if not validator.is_type(instance, "array"):
        return
    item_properties = schema.get("items", {}).get("properties", {})
    defaults = {key: item_properties.get(key, {}).get("default") for key in keys}
    seen: dict[tuple[Any, ...], int] = {}
    for index, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        identity = tuple(item.get(key, defaults[key]) for key in keys)
        if identity in seen:
            yield jsonschema.ValidationError(
                f"duplicate entry {dict(zip(keys, identity, strict=True))} (items {seen[identity]} and {index})"
            )
        seen[identity] = index


def _list_type(validator: Any, list_type: str, instance: Any, schema: Manifest) -> Iterator[Any]:
    if list_type == "set" and validator.is_type(instance, "array"):
        encoded = [json.dumps(item, sort_keys=True) for item in instance]
        if len(set(encoded)) != len(encoded):
            yield jsonschema.ValidationError("duplicate items in a list of type set")


def _cel_rules(
    validator: Any, rules: list[Manifest], instance: Any, schema: Manifest
) -> Iterator[Any]:
    yield jsonschema.ValidationError(
        "field is guarded by CEL rules that cannot be evaluated offline "
        f"({'; '.join(rule.get('rule', '?') for rule in rules)}); k8s/ manifests must not use it"
    )


_CrdValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator,
    {
        "x-kubernetes-list-map-keys": _list_map_keys,
        "x-kubernetes-list-type": _list_type,
        "x-kubernetes-validations": _cel_rules,
    },
)


@functools.cache
def crd_validator(kind: str) -> Any:
    schema = json.loads((DATA_DIR / CRD_SCHEMA_FILES[kind]).read_text())
    schema = copy.deepcopy(schema)
    close_schema(schema)
    # The served schema leaves these to the API server's routing; pin them here.
    schema["properties"]["apiVersion"] = {"type": "string", "enum": ["ray.io/v1"]}
    schema["properties"]["kind"] = {"type": "string", "enum": [kind]}
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return _CrdValidator(schema)


def crd_problems(obj: Manifest) -> list[str]:
    validator = crd_validator(obj.get("kind"))
    return sorted(
        f"{ref(obj)} (KubeRay CRD) {'.'.join(str(p) for p in error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(obj)
    )


# --- explicit checks --------------------------------------------------------------------------------


def check_submission_mode(objects: list[Manifest]) -> list[str]:
    return [
        f"{ref(o)}: spec.submissionMode {o['spec']['submissionMode']!r} is not one of {sorted(SUBMISSION_MODES)}"
        for o in objects
        if o.get("kind") == "RayJob"
        and o.get("spec", {}).get("submissionMode", "K8sJobMode") not in SUBMISSION_MODES
    ]


def check_kuberay_admission(objects: list[Manifest]) -> list[str]:
    """Rules KubeRay's validation (ray-operator/controllers/ray/utils/validation.go) enforces."""
    problems = []
    for obj in objects:
        if obj.get("kind") not in MAX_NAME_LENGTH:
            continue
        name = obj.get("metadata", {}).get("name", "")
        if not DNS1035_LABEL.match(name) or len(name) > MAX_NAME_LENGTH[obj["kind"]]:
            problems.append(
                f"{ref(obj)}: name must be a DNS-1035 label of at most {MAX_NAME_LENGTH[obj['kind']]} chars"
            )
        spec = obj.get("spec", {})
        if obj["kind"] == "RayJob":
            if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get(
                "shutdownAfterJobFinishes"
            ):
                problems.append(
                    f"{ref(obj)}: ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true"
                )
            if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
                problems.append(f"{ref(obj)}: suspend needs shutdownAfterJobFinishes: true")
            if spec.get("activeDeadlineSeconds", 1) <= 0:
                problems.append(f"{ref(obj)}: activeDeadlineSeconds must be positive")
            if spec.get("backoffLimit", 0) < 0:
                problems.append(f"{ref(obj)}: backoffLimit must be >= 0")
            if spec.get("submissionMode") == "InteractiveMode" and spec.get("backoffLimit", 0) > 0:
                problems.append(f"{ref(obj)}: backoffLimit is incompatible with InteractiveMode")
            if "rayClusterSpec" not in spec and "clusterSelector" not in spec:
                problems.append(f"{ref(obj)}: one of rayClusterSpec / clusterSelector is required")
        for where, cluster in ray_cluster_specs(obj):
            autoscaling = cluster.get("enableInTreeAutoscaling", False)
            if cluster.get("authOptions", {}).get("mode") == "token":
                version = tuple(
                    int(x) for x in re.findall(r"\d+", cluster.get("rayVersion", "0"))[:3]
                )
                if version < (2, 52, 0):
                    problems.append(f"{where}: authOptions.mode token needs rayVersion >= 2.52.0")
            for group in [cluster.get("headGroupSpec", {}), *cluster.get("workerGroupSpecs", [])]:
                params = group.get("rayStartParams", {})
                if group.get("resources") and {"num-cpus", "num-gpus", "memory", "resources"} & set(
                    params
                ):
                    problems.append(
                        f"{where}: group sets resources both in rayStartParams and resources"
                    )
                if "labels" in params:
                    problems.append(f"{where}: rayStartParams.labels is not supported; use labels")
            for group in cluster.get("workerGroupSpecs", []):
                low, high = group.get("minReplicas"), group.get("maxReplicas")
                label = f"{where} worker group {group.get('groupName')}"
                if not autoscaling and (low is None or high is None):
                    problems.append(
                        f"{label}: minReplicas and maxReplicas are required without autoscaling"
                    )
                    continue
                if low is not None and high is not None and not 0 <= low <= high:
                    problems.append(f"{label}: needs 0 <= minReplicas <= maxReplicas")
                replicas = group.get("replicas")
                if (
                    replicas is not None
                    and low is not None
                    and high is not None
                    and not low <= replicas <= high
                ):
                    problems.append(f"{label}: replicas {replicas} outside [{low}, {high}]")
    return problems


def check_cronjobs(objects: list[Manifest]) -> list[str]:
    problems = []
    for obj in objects:
        if obj.get("kind") != "CronJob":
            continue
        spec = obj.get("spec", {})
        policy = spec.get("concurrencyPolicy")
        if policy != "Forbid":
            valid = (
                ""
                if policy in CONCURRENCY_POLICIES
                else f" (not even a valid value: {sorted(CONCURRENCY_POLICIES)})"
            )
            problems.append(
                f"{ref(obj)}: concurrencyPolicy must be 'Forbid', got {policy!r}{valid}"
            )
        for field in (
            "startingDeadlineSeconds",
            "successfulJobsHistoryLimit",
            "failedJobsHistoryLimit",
        ):
            if not isinstance(spec.get(field), int) or spec[field] < 0:
                problems.append(f"{ref(obj)}: spec.{field} must be set to a non-negative int")
        job = spec.get("jobTemplate", {}).get("spec", {})
        for field in ("backoffLimit", "activeDeadlineSeconds"):
            if not isinstance(job.get(field), int) or job[field] < 0:
                problems.append(
                    f"{ref(obj)}: jobTemplate.spec.{field} must be set to a non-negative int"
                )
    return problems


def _positive_int_quantity(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value > 0
    return isinstance(value, str) and re.fullmatch(r"[1-9][0-9]*", value) is not None


def check_gpus(objects: list[Manifest]) -> list[str]:
    problems = []
    for obj in objects:
        for where, template in pod_templates(obj):
            pod = template.get("spec", {})
            for name, container in containers(template):
                resources = container.get("resources", {})
                values = {
                    part: resources.get(part, {}).get(GPU_RESOURCE)
                    for part in ("requests", "limits")
                }
                if values == {"requests": None, "limits": None}:
                    continue
                label = f"{where} {name}"
                for part, value in values.items():
                    if not _positive_int_quantity(value):
                        problems.append(
                            f"{label}: {part}.{GPU_RESOURCE} must be a positive integer, got {value!r}"
                        )
                if str(values["requests"]) != str(values["limits"]):
                    problems.append(
                        f"{label}: {GPU_RESOURCE} requests {values['requests']!r} != limits {values['limits']!r}"
                    )
                if not any(
                    t.get("key") == GPU_RESOURCE and t.get("effect") in (None, "NoSchedule")
                    for t in pod.get("tolerations", [])
                ):
                    problems.append(f"{label}: GPU pod does not tolerate the {GPU_RESOURCE} taint")
                if not pod.get("nodeSelector"):
                    problems.append(f"{label}: GPU pod has no nodeSelector")
        for where, cluster in ray_cluster_specs(obj):
            if not any(
                GPU_RESOURCE in c.get("resources", {}).get("limits", {})
                for g in cluster.get("workerGroupSpecs", [])
                for _, c in containers(g.get("template", {}))
            ):
                problems.append(f"{where}: no worker group requests {GPU_RESOURCE}")
    return problems


def check_resources(objects: list[Manifest]) -> list[str]:
    problems = []
    for obj in objects:
        for where, template in pod_templates(obj):
            for name, container in containers(template):
                resources = container.get("resources", {})
                for part in ("requests", "limits"):
                    missing = {"cpu", "memory"} - set(resources.get(part, {}))
                    if missing:
                        problems.append(f"{where} {name}: resources.{part} lacks {sorted(missing)}")
    return problems


def check_security(objects: list[Manifest]) -> list[str]:
    """Pod Security Standard "restricted", read-only root with a writable /tmp, Ray /dev/shm."""
    problems = []
    for obj in objects:
        for where, template in pod_templates(obj):
            pod = template.get("spec", {})
            context = pod.get("securityContext", {})
            if context.get("runAsNonRoot") is not True or context.get("runAsUser") != 1000:
                problems.append(
                    f"{where}: pod securityContext needs runAsNonRoot: true, runAsUser: 1000"
                )
            if context.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                problems.append(f"{where}: pod securityContext needs seccompProfile RuntimeDefault")
            for field in ("hostNetwork", "hostPID", "hostIPC"):
                if pod.get(field):
                    problems.append(f"{where}: {field} is not allowed")
            volumes = {v.get("name"): v for v in pod.get("volumes", [])}
            if any("hostPath" in v for v in volumes.values()):
                problems.append(f"{where}: hostPath volumes are not allowed")
            is_ray = "GroupSpec" in where  # head or worker group (not the submitter)
            for name, container in containers(template):
                label = f"{where} {name}"
                sc = container.get("securityContext", {})
                if sc.get("allowPrivilegeEscalation") is not False:
                    problems.append(f"{label}: allowPrivilegeEscalation must be false")
                if sc.get("privileged"):
                    problems.append(f"{label}: privileged is not allowed")
                if "ALL" not in sc.get("capabilities", {}).get("drop", []) or sc.get(
                    "capabilities", {}
                ).get("add"):
                    problems.append(f"{label}: capabilities must drop ALL and add none")
                if sc.get("runAsUser", 1000) == 0 or sc.get("runAsNonRoot") is False:
                    problems.append(f"{label}: must not run as root")
                mounts = {
                    m.get("mountPath"): volumes.get(m.get("name"), {})
                    for m in container.get("volumeMounts", [])
                }
                if sc.get("readOnlyRootFilesystem") is not True:
                    problems.append(f"{label}: readOnlyRootFilesystem must be true")
                elif "emptyDir" not in mounts.get("/tmp", {}):
                    problems.append(f"{label}: read-only root filesystem needs an emptyDir at /tmp")
                if (
                    is_ray
                    and mounts.get("/dev/shm", {}).get("emptyDir", {}).get("medium") != "Memory"
                ):
                    problems.append(
                        f"{label}: Ray container needs an emptyDir (medium Memory) at /dev/shm"
                    )
    return problems


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, f"{path}[{index}]")


def check_no_inline_secrets(objects: list[Manifest]) -> list[str]:
    problems = []
    for obj in objects:
        if obj.get("kind") == "Secret":
            problems.append(f"{ref(obj)}: Secrets are created out of band, never kept in k8s/")
        for path, node in _walk(obj):
            if isinstance(node, dict) and node.get("name") in SECRET_ENV_NAMES and "value" in node:
                problems.append(
                    f"{ref(obj)} {path}: {node['name']} has an inline value; use a secretRef"
                )
            if isinstance(node, str) and (
                AWS_KEY_ID.search(node) or SECRET_ASSIGNMENT.search(node)
            ):
                problems.append(f"{ref(obj)} {path}: looks like an inline AWS credential")
            if (
                isinstance(node, dict)
                and "secretRef" in node
                and node["secretRef"].get("name") != S3_SECRET_NAME
            ):
                problems.append(f"{ref(obj)} {path}: envFrom secretRef must name {S3_SECRET_NAME}")
    return problems


def check_rbac(objects: list[Manifest]) -> list[str]:
    problems = []
    for obj in objects:
        if obj.get("kind") in ("ClusterRole", "ClusterRoleBinding"):
            problems.append(f"{ref(obj)}: nothing cluster-wide; use a namespaced Role/RoleBinding")
        if obj.get("kind") != "Role":
            continue
        for index, rule in enumerate(obj.get("rules", [])):
            for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                if any("*" in item for item in rule.get(field, [])):
                    problems.append(f"{ref(obj)} rules[{index}].{field}: wildcards are not allowed")
            if {"secrets", "pods/exec", "serviceaccounts/token"} & set(rule.get("resources", [])):
                problems.append(f"{ref(obj)} rules[{index}]: no access to secrets / exec / tokens")
            if {"escalate", "bind", "impersonate"} & set(rule.get("verbs", [])):
                problems.append(
                    f"{ref(obj)} rules[{index}]: privilege-escalating verbs are not allowed"
                )
    return problems


def check_references(objects: list[Manifest]) -> list[str]:
    """ConfigMaps, ServiceAccounts and Roles that pods and bindings name exist beside them."""

    def names(kind: str) -> set[tuple[str, str]]:
        return {
            (o["metadata"].get("namespace", ""), o["metadata"]["name"])
            for o in objects
            if o.get("kind") == kind
        }

    config_maps, accounts, roles = names("ConfigMap"), names("ServiceAccount"), names("Role")
    problems = []
    for obj in objects:
        namespace = obj.get("metadata", {}).get("namespace", "")
        for where, template in pod_templates(obj):
            pod = template.get("spec", {})
            account = pod.get("serviceAccountName")
            if account and (namespace, account) not in accounts:
                problems.append(f"{where}: ServiceAccount {account} is not defined")
            for volume in pod.get("volumes", []):
                name = volume.get("configMap", {}).get("name")
                if name and (namespace, name) not in config_maps:
                    problems.append(f"{where}: ConfigMap {name} is not defined")
            declared = {v.get("name") for v in pod.get("volumes", [])}
            for label, container in containers(template):
                for mount in container.get("volumeMounts", []):
                    if mount.get("name") not in declared:
                        problems.append(
                            f"{where} {label}: volumeMount {mount.get('name')} has no volume"
                        )
        if obj.get("kind") == "RoleBinding":
            role = obj.get("roleRef", {})
            if role.get("kind") != "Role" or (namespace, role.get("name")) not in roles:
                problems.append(f"{ref(obj)}: roleRef must name a Role in the same namespace")
            for subject in obj.get("subjects", []):
                if subject.get("kind") != "ServiceAccount":
                    continue
                if namespace and subject.get("namespace", namespace) != namespace:
                    problems.append(
                        f"{ref(obj)}: subject {subject.get('name')} is in another namespace"
                    )
                if (namespace, subject.get("name")) not in accounts:
                    problems.append(
                        f"{ref(obj)}: subject ServiceAccount {subject.get('name')} is not defined"
                    )
    return problems


def check_ray_version(objects: list[Manifest], ray_version: str) -> list[str]:
    """rayVersion and the image tags carry the Ray version installed with the project."""
    tag_pattern = re.compile(rf"(?:^|[-_])ray{re.escape(ray_version)}(?:$|[-_])")
    problems = []
    for obj in objects:
        for where, cluster in ray_cluster_specs(obj):
            if cluster.get("rayVersion") != ray_version:
                problems.append(
                    f"{where}.rayVersion {cluster.get('rayVersion')!r} != installed Ray {ray_version}"
                )
        for where, template in pod_templates(obj):
            for name, container in containers(template):
                _, tag, _ = split_image(container.get("image", ""))
                if not tag or not tag_pattern.search(tag):
                    problems.append(
                        f"{where} {name}: image {container.get('image')!r} tag does not carry ray{ray_version}"
                    )
    return problems


CHECKS: list[Callable[[list[Manifest]], list[str]]] = [
    check_submission_mode,
    check_kuberay_admission,
    check_cronjobs,
    check_gpus,
    check_resources,
    check_security,
    check_no_inline_secrets,
    check_rbac,
    check_references,
]
