"""Render the kustomizations under ``k8s/`` without kubectl, for offline tests.

This is the subset of kustomize (v5) that the project's kustomizations use, and nothing else:
``resources`` (files and directories, recursively), ``configMapGenerator`` with ``files`` and
``behavior`` create / merge / replace (only with ``generatorOptions.disableNameSuffixHash``),
``namespace``, ``patches`` (JSON 6902 operation lists, or strategic-merge patches free of lists)
and ``images``. Any other kustomization field, or a feature of a supported field that is not
implemented, raises :class:`UnsupportedKustomization` instead of being silently ignored, so the
manifests cannot drift into something this resolver renders differently from ``kubectl apply -k``.
When ``kubectl`` is available the tests also compare this output with ``kubectl kustomize``.

Transformations run in kustomize's order: sub-kustomizations first, then generators, namespace,
patches, images.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

SUPPORTED_FIELDS = frozenset(
    {
        "apiVersion",
        "kind",
        "resources",
        "namespace",
        "images",
        "patches",
        "configMapGenerator",
        "generatorOptions",
    }
)
# Kinds kustomize treats as cluster-scoped among those we could plausibly use; everything else
# (custom resources included) gets the namespace.
CLUSTER_SCOPED_KINDS = frozenset(
    {
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "PersistentVolume",
        "StorageClass",
        "PriorityClass",
        "RuntimeClass",
        "ValidatingWebhookConfiguration",
        "MutatingWebhookConfiguration",
    }
)

Manifest = dict[str, Any]


class UnsupportedKustomization(ValueError):
    """The kustomization uses something this resolver does not implement."""


def render(directory: Path) -> list[Manifest]:
    """Render the kustomization in ``directory`` to a list of manifests (dicts)."""
    directory = Path(directory)
    kustomization = _load_kustomization(directory)
    unknown = set(kustomization) - SUPPORTED_FIELDS
    if unknown:
        raise UnsupportedKustomization(
            f"{directory}/kustomization.yaml: fields {sorted(unknown)} are not implemented by "
            f"tests/k8s/kustomize_lite.py; implement them there or use only {sorted(SUPPORTED_FIELDS)}"
        )

    objects: list[Manifest] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        if path.is_dir():
            objects.extend(render(path))
        else:
            objects.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)

    _generate_config_maps(directory, kustomization, objects)
    if "namespace" in kustomization:
        _set_namespace(objects, kustomization["namespace"])
    for patch in kustomization.get("patches", []):
        _apply_patch(directory, patch, objects)
    for image in kustomization.get("images", []):
        _set_image(objects, image)
    return objects


def _load_kustomization(directory: Path) -> dict[str, Any]:
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise UnsupportedKustomization(f"{directory}: no kustomization.yaml")
    data = yaml.safe_load(path.read_text()) or {}
    if data.get("kind", "Kustomization") != "Kustomization":
        raise UnsupportedKustomization(f"{path}: kind {data['kind']!r} is not Kustomization")
    return data


# --- configMapGenerator -------------------------------------------------------------------------


def _generate_config_maps(
    directory: Path, kustomization: dict[str, Any], objects: list[Manifest]
) -> None:
    generators = kustomization.get("configMapGenerator", [])
    if not generators:
        return
    options = kustomization.get("generatorOptions", {})
    if set(options) - {"disableNameSuffixHash"} or options.get("disableNameSuffixHash") is not True:
        raise UnsupportedKustomization(
            f"{directory}: configMapGenerator needs generatorOptions: {{disableNameSuffixHash: true}} "
            "(hash suffixes are not rewritten inside RayCluster/RayJob pod templates)"
        )
    for generator in generators:
        unknown = set(generator) - {"name", "namespace", "behavior", "files"}
        if unknown:
            raise UnsupportedKustomization(
                f"{directory}: configMapGenerator fields {sorted(unknown)}"
            )
        data: dict[str, str] = {}
        for spec in generator.get("files", []):
            key, _, file_name = spec.rpartition("=") if "=" in spec else (None, "", spec)
            file_path = directory / file_name
            data[key or file_path.name] = file_path.read_text()
        name = generator["name"]
        existing = [
            o for o in objects if o.get("kind") == "ConfigMap" and o["metadata"]["name"] == name
        ]
        behavior = generator.get("behavior", "create")
        if behavior == "create":
            if existing:
                raise UnsupportedKustomization(f"{directory}: ConfigMap {name} already exists")
            metadata: dict[str, Any] = {"name": name}
            if "namespace" in generator:
                metadata["namespace"] = generator["namespace"]
            objects.append(
                {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}
            )
        elif behavior in ("merge", "replace"):
            if len(existing) != 1:
                raise UnsupportedKustomization(
                    f"{directory}: behavior {behavior} needs one base ConfigMap {name}"
                )
            target = existing[0]
            target["data"] = {**target.get("data", {}), **data} if behavior == "merge" else data
        else:
            raise UnsupportedKustomization(f"{directory}: configMapGenerator behavior {behavior!r}")


# --- namespace ----------------------------------------------------------------------------------


def _set_namespace(objects: list[Manifest], namespace: str) -> None:
    # Namespaces of ServiceAccounts before the change, to follow RoleBinding subjects the way
    # kustomize's name-reference transformer does.
    service_accounts = {
        o["metadata"]["name"]: o["metadata"].get("namespace", "default")
        for o in objects
        if o.get("kind") == "ServiceAccount"
    }
    for obj in objects:
        if obj.get("kind") in CLUSTER_SCOPED_KINDS:
            continue
        obj.setdefault("metadata", {})["namespace"] = namespace
    for obj in objects:
        if obj.get("kind") not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        for subject in obj.get("subjects", []):
            if subject.get("kind") != "ServiceAccount":
                continue
            name = subject.get("name")
            # kustomize: subjects named "default" always follow; others follow the ServiceAccount
            # they name when it is one of the resources and the subject pointed at its namespace.
            if name == "default" or (
                name in service_accounts
                and subject.get("namespace", "default") == service_accounts[name]
            ):
                subject["namespace"] = namespace


# --- patches ------------------------------------------------------------------------------------


def _apply_patch(directory: Path, patch: dict[str, Any], objects: list[Manifest]) -> None:
    unknown = set(patch) - {"path", "patch", "target"}
    if unknown:
        raise UnsupportedKustomization(
            f"{directory}: patch fields {sorted(unknown)} (e.g. options)"
        )
    if ("path" in patch) == ("patch" in patch):
        raise UnsupportedKustomization(f"{directory}: a patch needs exactly one of path / patch")
    text = (directory / patch["path"]).read_text() if "path" in patch else patch["patch"]
    body = yaml.safe_load(text)
    target = patch.get("target")
    if target is None:
        if not isinstance(body, dict):
            raise UnsupportedKustomization(f"{directory}: a JSON 6902 patch needs a target")
        target = {"kind": body.get("kind"), "name": body.get("metadata", {}).get("name")}
    matches = [o for o in objects if _matches(o, target, directory)]
    if not matches:
        raise UnsupportedKustomization(f"{directory}: patch target {target} matches no resource")
    for obj in matches:
        if isinstance(body, list):
            _apply_json6902(obj, body)
        elif isinstance(body, dict):
            _merge(obj, {k: v for k, v in body.items() if k not in ("apiVersion", "kind")}, "")
        else:
            raise UnsupportedKustomization(f"{directory}: patch is neither a list nor a mapping")


def _matches(obj: Manifest, target: dict[str, Any], directory: Path) -> bool:
    unknown = set(target) - {"group", "version", "kind", "name", "namespace"}
    if unknown:
        raise UnsupportedKustomization(f"{directory}: patch target selectors {sorted(unknown)}")
    group, _, version = obj.get("apiVersion", "").rpartition("/")
    actual = {
        "group": group,
        "version": version,
        "kind": obj.get("kind"),
        "name": obj.get("metadata", {}).get("name"),
        "namespace": obj.get("metadata", {}).get("namespace", ""),
    }
    # kustomize matches target fields as anchored regular expressions.
    return all(
        value is None or re.fullmatch(str(value), str(actual[key] or "")) is not None
        for key, value in target.items()
    )


def _merge(into: dict[str, Any], patch: dict[str, Any], where: str) -> None:
    """Strategic merge restricted to mappings (where it equals a JSON merge patch)."""
    for key, value in patch.items():
        if value is None:
            into.pop(key, None)
        elif isinstance(value, list):
            raise UnsupportedKustomization(
                f"strategic merge patch sets the list {where}/{key}: list merge keys are not "
                "implemented (and unknown to kustomize for CRDs); use a JSON 6902 patch"
            )
        elif isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value, f"{where}/{key}")
        else:
            into[key] = copy.deepcopy(value)


def _decode_pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise UnsupportedKustomization(f"JSON pointer {path!r} must start with /")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _apply_json6902(obj: Manifest, operations: list[dict[str, Any]]) -> None:
    for operation in operations:
        op, parts = operation["op"], _decode_pointer(operation["path"])
        parent: Any = obj
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1]
        if op in ("add", "replace", "test"):
            value = copy.deepcopy(operation["value"])
            if isinstance(parent, list):
                index = len(parent) if last == "-" else int(last)
                if op == "add":
                    parent.insert(index, value)
                elif op == "replace":
                    parent[index] = value
                elif parent[index] != value:
                    raise AssertionError(f"JSON 6902 test failed at {operation['path']}")
            else:
                if op == "replace" and last not in parent:
                    raise KeyError(f"JSON 6902 replace: {operation['path']} does not exist")
                if op == "test":
                    if parent.get(last) != value:
                        raise AssertionError(f"JSON 6902 test failed at {operation['path']}")
                else:
                    parent[last] = value
        elif op == "remove":
            if isinstance(parent, list):
                del parent[int(last)]
            else:
                del parent[last]
        else:
            raise UnsupportedKustomization(
                f"JSON 6902 operation {op!r} (move/copy) is not implemented"
            )


# --- images -------------------------------------------------------------------------------------


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """``registry:5000/a/b:tag@sha256:...`` -> (name, tag, digest)."""
    name, _, digest = image.partition("@")
    tag = None
    slash, colon = name.rfind("/"), name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest or None


def _set_image(objects: list[Manifest], image: dict[str, Any]) -> None:
    unknown = set(image) - {"name", "newName", "newTag", "digest"}
    if unknown:
        raise UnsupportedKustomization(f"images fields {sorted(unknown)}")

    def rewrite(value: str) -> str:
        name, tag, digest = split_image(value)
        if name != image["name"]:
            return value
        name = image.get("newName", name)
        if "digest" in image:
            return f"{name}@{image['digest']}"
        tag = image.get("newTag", tag)
        return (
            name
            + (f":{tag}" if tag else "")
            + (f"@{digest}" if digest and "newTag" not in image else "")
        )

    # Like kustomize's image filter for kinds it has no field specs for (custom resources): any
    # `image` of an item in a `containers` / `initContainers` list, at any depth.
    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    for container in value:
                        if isinstance(container, dict) and isinstance(container.get("image"), str):
                            container["image"] = rewrite(container["image"])
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for obj in objects:
        walk(obj)
