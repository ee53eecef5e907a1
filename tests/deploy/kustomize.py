"""A small kustomize build, in Python: what deploy/kubernetes uses, and nothing more.

``kubectl apply -k`` builds the kustomizations; the tests need the same objects without a
cluster or a kustomize binary, so this reads the fields deploy/kubernetes uses (resources,
namespace, replicas, images, patches as strategic-merge files) and refuses any other: a field
added to a kustomization must be added here too, or the tests fail instead of checking less.
Where kubectl is installed, the tests also compare this build with ``kubectl kustomize``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Object = dict[str, Any]

KUSTOMIZATION_KEYS = {
    "apiVersion", "kind", "resources", "namespace", "replicas", "images", "patches",
}  # fmt: skip
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass"}
WORKLOADS = {"Deployment", "StatefulSet", "ReplicaSet"}


class KustomizeError(Exception):
    pass


def load_documents(path: Path) -> list[Object]:
    """Every object of a YAML file (several separated by ---), empty documents left out."""
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for document in documents:
        if not isinstance(document, dict):
            raise KustomizeError(f"{path}: a document is not a mapping")
    return documents


def kustomization(directory: Path) -> Object:
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    (document,) = load_documents(path)
    unknown = set(document) - KUSTOMIZATION_KEYS
    if unknown:
        raise KustomizeError(f"{path}: fields this build does not know: {sorted(unknown)}")
    if (document.get("apiVersion"), document.get("kind")) != (
        "kustomize.config.k8s.io/v1beta1",
        "Kustomization",
    ):
        raise KustomizeError(f"{path}: not a kustomize.config.k8s.io/v1beta1 Kustomization")
    return document


def build(directory: Path) -> list[Object]:
    """The objects ``kubectl kustomize directory`` would print (in resource order)."""
    spec = kustomization(directory)
    objects: list[Object] = []
    for entry in spec.get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            objects.extend(build(target))
        elif target.is_file():
            # Like kustomize's default load restrictor: files of this directory or below.
            if not target.is_relative_to(directory.resolve()):
                raise KustomizeError(f"{directory}: {entry} is outside the kustomization")
            objects.extend(load_documents(target))
        else:
            raise KustomizeError(f"{directory}: resource {entry} does not exist")
    ids = [identity(obj) for obj in objects]
    if len(set(ids)) != len(ids):
        raise KustomizeError(f"{directory}: an object is defined twice: {ids}")
    for patch in spec.get("patches", []):
        if set(patch) != {"path"}:
            raise KustomizeError(f"{directory}: only patches by path are supported: {patch}")
        for document in load_documents(directory / patch["path"]):
            matches = [obj for obj in objects if same_object(obj, document)]
            if len(matches) != 1:
                raise KustomizeError(f"{directory}: patch {patch['path']} matches {len(matches)}")
            index = objects.index(matches[0])
            objects[index] = merge(matches[0], document)
    for replica in spec.get("replicas", []):
        matches = [o for o in objects if o["kind"] in WORKLOADS and name(o) == replica["name"]]
        if not matches:
            raise KustomizeError(f"{directory}: replicas: no workload {replica['name']}")
        for obj in matches:
            obj["spec"]["replicas"] = replica["count"]
    for image in spec.get("images", []):
        if not set_image(objects, image):
            raise KustomizeError(f"{directory}: images: no container uses {image['name']}")
    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = spec["namespace"]
    return objects


def name(obj: Object) -> str:
    return str(obj["metadata"]["name"])


def identity(obj: Object) -> tuple[str, str, str]:
    return (obj["apiVersion"], obj["kind"], name(obj))


def same_object(obj: Object, patch: Object) -> bool:
    group = str(patch.get("apiVersion", "")).rpartition("/")[0]
    return (
        obj["kind"] == patch["kind"]
        and name(obj) == name(patch)
        and str(obj["apiVersion"]).rpartition("/")[0] == group
    )


def merge(base: Any, patch: Any) -> Any:
    """A strategic merge, for the shapes used here: mappings merge key by key, lists of
    mappings that all have a ``name`` merge item by item (containers, ports, volumes), any
    other value is replaced, and null deletes."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = merge(merged[key], value)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and _named(base) and _named(patch):
        merged_list = [copy.deepcopy(item) for item in base]
        for item in patch:
            for index, existing in enumerate(merged_list):
                if existing["name"] == item["name"]:
                    merged_list[index] = merge(existing, item)
                    break
            else:
                merged_list.append(copy.deepcopy(item))
        return merged_list
    return copy.deepcopy(patch)


def _named(items: list[Any]) -> bool:
    return bool(items) and all(isinstance(item, dict) and "name" in item for item in items)


def containers(obj: Object) -> list[Object]:
    """The containers (init containers too) of a workload's pod template."""
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def set_image(objects: list[Object], image: Object) -> bool:
    found = False
    for obj in objects:
        for container in containers(obj):
            repository, _, tag = str(container["image"]).partition(":")
            if repository != image["name"]:
                continue
            found = True
            repository = image.get("newName", repository)
            tag = image.get("newTag", tag)
            container["image"] = f"{repository}:{tag}" if tag else repository
    return found
