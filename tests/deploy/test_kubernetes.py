"""deploy/kubernetes, checked without a cluster.

The kustomizations are built (tests/deploy/kustomize.py, compared with ``kubectl kustomize``
where kubectl is installed) and every object is validated against the Kubernetes JSON schemas
that the kubernetes-validate package ships (strict: an unknown field is an error), for the
oldest and the newest Kubernetes release the files claim. Then the objects are held against
the application: its port and endpoints, its argument parser, its settings' environment
names and values (loaded by Odin's own loader), its drain timings and its connection limits.
"""

from __future__ import annotations

import copy
import math
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from odin_fanout.capacity import Limits, plan
from odin_fanout.cli import build_parser
from odin_fanout.config import Config, load_config
from odin_fanout.control.paths import default_directory
from odin_fanout.host.supervisor import STOP_GRACE
from odin_fanout.publisher.config import PublisherConfig
from odin_fanout.publisher.config import load as load_publisher_config
from odin_fanout.version import __version__
from tests.deploy import kustomize
from tests.deploy.kustomize import KustomizeError, Object
from tests.deploy.tools import (
    DEPLOY,
    ROOT,
    missing,
    output,
    publisher_paths,
    publisher_settings,
    run,
    server_paths,
    server_settings,
)

KUBERNETES = DEPLOY / "kubernetes"
BASE = KUBERNETES / "base"
INGRESS = KUBERNETES / "ingress-nginx"
EXAMPLE = KUBERNETES / "overlays" / "example"
NATS_VALUES = EXAMPLE / "nats-values.yaml"
DOC = ROOT / "docs" / "deployment" / "kubernetes.md"
BUILDS = {"base": BASE, "ingress-nginx": INGRESS, "example": EXAMPLE}
"""Every kustomization, by name: together they use every manifest in deploy/kubernetes."""
SERVER_BUILDS = {"base": BASE, "example": EXAMPLE}

OLDEST_KUBERNETES = "1.30.0"
"""The oldest release the manifests are validated for (docs/deployment/kubernetes.md)."""

PENDING_SETTINGS = {"ODIN_NATS_REPLICAS"}
"""Settings the overlays set ahead of the code (nats.replicas, being added to odin_fanout.config):
allowed while they are not settings yet; once they are, they are checked like the others."""


def built(directory: Path) -> list[Object]:
    return kustomize.build(directory)


def find(objects: list[Object], kind: str, name: str) -> Object:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def pod_spec(deployment: Object) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def container(deployment: Object, name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [
        c for c in pod_spec(deployment)["containers"] if c["name"] == name
    ]
    assert len(found) == 1, f"container {name}: {len(found)} found"
    return found[0]


def config_data(objects: list[Object], deployment: Object, name: str) -> dict[str, str]:
    """The environment the container gets: its ConfigMaps (envFrom), then its own env."""
    env: dict[str, str] = {}
    for source in container(deployment, name).get("envFrom", []):
        config_map = find(objects, "ConfigMap", source["configMapRef"]["name"])
        env.update(config_map.get("data", {}))
    for item in container(deployment, name).get("env", []):
        assert "value" in item, f"{item['name']}: only plain values are expected"
        env[item["name"]] = item["value"]
    return env


def port_number(deployment: Object, name: str, port: int | str) -> int:
    """A probe's or a Service's port: a number, or the name of a container port."""
    if isinstance(port, int):
        return port
    numbers = [
        p["containerPort"] for p in container(deployment, name)["ports"] if p["name"] == port
    ]
    assert len(numbers) == 1, f"no container port named {port}"
    return int(numbers[0])


def quantity(value: str | int) -> float:
    """A Kubernetes quantity (CPU or memory) as a number: cores, or bytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti|k|M|G|T)?", str(value))
    assert match is not None, f"not a quantity: {value!r}"
    scale = {
        None: 1, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
        "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
    }[match.group(2)]  # fmt: skip
    return float(match.group(1)) * scale


def pre_stop_seconds(odin: dict[str, Any]) -> float:
    hook = odin["lifecycle"]["preStop"]
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return float(command[1])


def derived_connections(memory: str | int, workers: int) -> int:
    limits = Limits(int(quantity(memory)), "cgroup v2", float(workers), "cgroup v2", 1 << 20)
    history = Config().history.max_bytes
    return plan(0, limits, workers=workers, history_bytes=history).host_max_connections


# ---- the schemas -------------------------------------------------------------------------------


def validator() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        missing("kubernetes-validate is not installed (pip install kubernetes-validate, dev extra)")
    return kubernetes_validate


@pytest.mark.parametrize("build", list(BUILDS), ids=list(BUILDS))
@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, "latest"])
def test_every_object_matches_the_kubernetes_schema(build: str, version: str) -> None:
    validate = validator()
    release = validate.latest_version() if version == "latest" else version
    objects = built(BUILDS[build])
    assert objects
    for obj in objects:
        try:
            validate.validate(obj, release, strict=True)
        except validate.ValidationError as error:
            location = "/".join(str(part) for part in error.absolute_path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} at {location}: {error.message}")


def test_the_schema_check_refuses_a_broken_object() -> None:
    validate = validator()
    deployment = find(built(BASE), "Deployment", "odin")
    misspelt = copy.deepcopy(deployment)
    probe = container(misspelt, "odin").pop("readinessProbe")
    container(misspelt, "odin")["readinesProbe"] = probe
    with pytest.raises(validate.ValidationError):
        validate.validate(misspelt, validate.latest_version(), strict=True)
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    with pytest.raises(validate.ValidationError):
        validate.validate(wrong_type, validate.latest_version(), strict=True)


def test_every_manifest_is_part_of_a_build() -> None:
    """No file lies beside the kustomizations unchecked."""
    used = {NATS_VALUES}
    for directory in BUILDS.values():
        spec = kustomize.kustomization(directory)
        used.add(directory / "kustomization.yaml")
        used.update(
            directory / entry
            for entry in spec.get("resources", [])
            if (directory / entry).is_file()
        )
        used.update(directory / patch["path"] for patch in spec.get("patches", []))
    files = {path.resolve() for path in (*KUBERNETES.rglob("*.yaml"), *KUBERNETES.rglob("*.yml"))}
    unused = files - {path.resolve() for path in used}
    assert not unused, sorted(map(str, unused))


# ---- the build ---------------------------------------------------------------------------------


@pytest.mark.parametrize("build", list(BUILDS), ids=list(BUILDS))
def test_the_build_is_the_one_kubectl_makes(build: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        # Not required in CI: no package registry here ships kubectl; the build above is
        # then the only one (its fields are limited to the ones it implements).
        pytest.skip("kubectl is not installed: the Python build alone is checked")
    result = run(kubectl, "kustomize", str(BUILDS[build]))
    assert result.returncode == 0, output(result)
    theirs = [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]

    def key(obj: Object) -> tuple[str, str, str]:
        return (obj["kind"], obj["metadata"]["name"], obj["metadata"].get("namespace", ""))

    ours = built(BUILDS[build])
    assert sorted(map(key, ours)) == sorted(map(key, theirs))
    by_key = {key(obj): obj for obj in theirs}
    for obj in ours:
        assert obj == by_key[key(obj)], f"{key(obj)} differs from kubectl kustomize"


def test_the_build_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "commonLabels: {team: odin}\nresources: [missing.yaml]\n"
    )
    with pytest.raises(KustomizeError, match="commonLabels"):
        kustomize.build(tmp_path)


def test_the_overlay_changes_what_it_says() -> None:
    base, example = built(BASE), built(EXAMPLE)
    assert {obj["metadata"].get("namespace") for obj in example if obj["kind"] != "Namespace"} == {
        "odin"
    }
    assert find(example, "Namespace", "odin")
    assert find(example, "Deployment", "odin")["spec"]["replicas"] == 3
    assert find(base, "Deployment", "odin")["spec"]["replicas"] >= 2
    resources = container(find(example, "Deployment", "odin"), "odin")["resources"]
    assert resources != container(find(base, "Deployment", "odin"), "odin")["resources"]
    data = find(example, "ConfigMap", "odin-config")["data"]
    # The base's settings are kept; the overlay's are added.
    assert set(find(base, "ConfigMap", "odin-config")["data"]) < set(data)


# ---- the server against the application ----------------------------------------------------------


@pytest.fixture(params=list(SERVER_BUILDS), ids=list(SERVER_BUILDS))
def objects(request: pytest.FixtureRequest) -> list[Object]:
    return built(SERVER_BUILDS[request.param])


def test_the_command_is_serve_with_a_worker_per_cpu(objects: list[Object]) -> None:
    odin = container(find(objects, "Deployment", "odin"), "odin")
    # The image's entry point (odin) is kept: args are its arguments, as the CLI parses them.
    assert "command" not in odin
    args = build_parser().parse_args(odin["args"])
    assert args.command == "serve"
    assert args.workers == 0
    cpu = quantity(odin["resources"]["limits"]["cpu"])
    assert math.ceil(cpu) >= 2, "one worker is what a single process gives: no supervisor"
    repository, _, tag = odin["image"].rpartition(":")
    assert repository.rpartition("/")[2] == "odin"
    assert tag == __version__


def test_the_settings_are_real_and_load(objects: list[Object]) -> None:
    deployment = find(objects, "Deployment", "odin")
    env = config_data(objects, deployment, "odin")
    known = server_settings()
    pending = PENDING_SETTINGS - known
    for name in env:
        assert name in known or name in pending, f"{name} is not a server setting"
    config, unknown = load_config(environ=env)
    assert set(unknown) == pending & set(env)
    assert config.server.host == "0.0.0.0"
    assert config.log.format == "json"
    assert config.simulator.enabled is False
    # Odin derives its connection limit from the memory limit, its workers from the CPU limit.
    assert "ODIN_SERVER_MAX_CONNECTIONS" not in env
    assert "ODIN_SERVER_WORKERS" not in env
    nats_service = yaml.safe_load(NATS_VALUES.read_text())["fullnameOverride"]
    assert re.fullmatch(rf"nats://{nats_service}:4222", config.nats.url), config.nats.url
    port = port_number(deployment, "odin", "http")
    assert config.server.port == port == Config().server.port


def test_the_probes_ask_what_the_server_answers(objects: list[Object]) -> None:
    deployment = find(objects, "Deployment", "odin")
    odin = container(deployment, "odin")
    port = Config().server.port
    readiness = odin["readinessProbe"]["httpGet"]
    assert readiness["path"] == "/ready"
    assert readiness["path"] in server_paths()
    assert port_number(deployment, "odin", readiness["port"]) == port
    # Liveness must not depend on NATS: /health and /ready answer 503 while it is unreachable.
    liveness = odin["livenessProbe"]
    if "httpGet" in liveness:
        assert liveness["httpGet"]["path"] in server_paths() - {"/health", "/ready"}
        probe_port = liveness["httpGet"]["port"]
    else:
        assert set(liveness) & {"tcpSocket", "httpGet", "exec", "grpc"} == {"tcpSocket"}
        probe_port = liveness["tcpSocket"]["port"]
    assert port_number(deployment, "odin", probe_port) == port


def test_the_grace_period_covers_the_pre_stop_and_the_drain(objects: list[Object]) -> None:
    deployment = find(objects, "Deployment", "odin")
    odin = container(deployment, "odin")
    drain = Config().shutdown.drain_timeout
    pre_stop = pre_stop_seconds(odin)
    assert 0 < pre_stop <= 15
    grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
    assert grace > pre_stop + drain + STOP_GRACE
    # Rolling updates keep every replica asked for while the old pods drain.
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0


def test_a_disruption_budget_covers_the_servers(objects: list[Object]) -> None:
    deployment = find(objects, "Deployment", "odin")
    budgets = [
        obj
        for obj in objects
        if obj["kind"] == "PodDisruptionBudget"
        and obj["spec"]["selector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert len(budgets) == 1
    spec = budgets[0]["spec"]
    replicas = deployment["spec"]["replicas"]
    if "maxUnavailable" in spec:
        assert 1 <= spec["maxUnavailable"] < replicas
    else:
        assert 1 <= spec["minAvailable"] < replicas


def test_resources_are_limited_and_guaranteed(objects: list[Object]) -> None:
    for name, container_name in (("odin", "odin"), ("odin-publisher", "publisher")):
        resources = container(find(objects, "Deployment", name), container_name)["resources"]
        limits, requests = resources["limits"], resources["requests"]
        # The memory limit is what Odin reads from the cgroup; without it, the node's memory.
        assert quantity(limits["memory"]) >= 128 * 2**20
        assert quantity(requests["memory"]) == quantity(limits["memory"])
        assert "cpu" in limits
    odin = container(find(objects, "Deployment", "odin"), "odin")["resources"]
    assert odin["requests"] == odin["limits"], "the server's pods are Guaranteed"


def test_the_pods_run_unprivileged_with_a_writable_tmp(objects: list[Object]) -> None:
    for name, container_name in (("odin", "odin"), ("odin-publisher", "publisher")):
        deployment = find(objects, "Deployment", name)
        pod = pod_spec(deployment)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001  # the image's user
        # With the container's settings below: the restricted Pod Security Standard.
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        # Services would add ODIN_<SERVICE>_* variables to the environment Odin reads.
        assert pod["enableServiceLinks"] is False
        assert pod["automountServiceAccountToken"] is False
        security = container(deployment, container_name)["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        mounts = {m["mountPath"]: m["name"] for m in container(deployment, container_name)[
            "volumeMounts"
        ]}  # fmt: skip
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]
    # Odin's control sockets: XDG_RUNTIME_DIR is unset, so /tmp/odin-<uid>, on the emptyDir.
    env = config_data(objects, find(objects, "Deployment", "odin"), "odin")
    assert "XDG_RUNTIME_DIR" not in env
    assert default_directory({}, uid=10001).parent == Path("/tmp")


def test_the_services_reach_the_pods(objects: list[Object]) -> None:
    for service_name, container_name, port in (
        ("odin", "odin", Config().server.port),
        ("odin-publisher", "publisher", PublisherConfig().http.port),
    ):
        service = find(objects, "Service", service_name)
        deployment = find(objects, "Deployment", service_name)
        assert service["spec"]["type"] == "ClusterIP"
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        (service_port,) = service["spec"]["ports"]
        assert service_port["port"] == port
        assert port_number(deployment, container_name, service_port["targetPort"]) == port


def test_the_publisher_is_one_pod_with_its_own_settings(objects: list[Object]) -> None:
    deployment = find(objects, "Deployment", "odin-publisher")
    # Two publishers would publish every event twice, even for a moment during an update.
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    publisher = container(deployment, "publisher")
    assert publisher["image"].rpartition(":")[2] == __version__
    env = config_data(objects, deployment, "publisher")
    known = publisher_settings()
    for name in env:
        assert name in known, f"{name} is not a publisher setting"
    config, unknown = load_publisher_config(environ=env)
    assert unknown == []
    assert config.http.host == "0.0.0.0"
    port = port_number(deployment, "publisher", "http")
    assert config.http.port == port
    nats_service = yaml.safe_load(NATS_VALUES.read_text())["fullnameOverride"]
    assert config.nats.url == f"nats://{nats_service}:4222"
    assert publisher["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert publisher["livenessProbe"]["httpGet"]["path"] == "/health"
    for probe in ("readinessProbe", "livenessProbe"):
        get = publisher[probe]["httpGet"]
        assert get["path"] in publisher_paths()
        assert port_number(deployment, "publisher", get["port"]) == port


# ---- the Ingress, NATS and the docs ----------------------------------------------------------


def test_the_ingress_keeps_websockets_open() -> None:
    objects = built(EXAMPLE)
    ingress = find(objects, "Ingress", "odin")
    annotations = ingress["metadata"]["annotations"]
    connection = Config().connection
    for direction in ("read", "send"):
        timeout = float(annotations[f"nginx.ingress.kubernetes.io/proxy-{direction}-timeout"])
        # Odin pings every ping_interval and drops a client silent for idle_timeout: the
        # proxy must not be the first to give up on a quiet connection.
        assert timeout > connection.idle_timeout > connection.ping_interval
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    assert path["path"] == Config().server.ws_path
    backend = path["backend"]["service"]
    service = find(objects, "Service", backend["name"])
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    # The publisher's control API has no authentication: never published.
    assert all(
        p["backend"]["service"]["name"] != "odin-publisher"
        for r in ingress["spec"]["rules"]
        for p in r["http"]["paths"]
    )


def test_nats_is_a_replicated_jetstream_cluster_on_disk() -> None:
    values = yaml.safe_load(NATS_VALUES.read_text())
    config = values["config"]
    assert config["cluster"]["enabled"] is True
    replicas = config["cluster"]["replicas"]
    assert replicas == 3
    assert config["jetstream"]["enabled"] is True
    assert config["jetstream"]["fileStore"]["enabled"] is True
    assert config["jetstream"]["fileStore"]["pvc"]["enabled"] is True
    # Odin's stream is on file storage, replicated over the cluster's servers.
    assert Config().nats.storage == "file"
    data = find(built(EXAMPLE), "ConfigMap", "odin-config")["data"]
    assert int(data["ODIN_NATS_REPLICAS"]) == replicas
    assert values["container"]["image"]["tag"].startswith("2.")


def test_the_doc_quotes_the_derived_connection_limits() -> None:
    text = " ".join(DOC.read_text().split())
    for directory in SERVER_BUILDS.values():
        objects = built(directory)
        deployment = find(objects, "Deployment", "odin")
        limits = container(deployment, "odin")["resources"]["limits"]
        workers = math.ceil(quantity(limits["cpu"]))
        total = derived_connections(limits["memory"], workers)
        quoted = f"{total:,} connections per pod ({total // workers:,} per worker)"
        assert quoted in text, f"{directory.name}: the doc should say {quoted!r}"
        replicas = deployment["spec"]["replicas"]
        if directory == EXAMPLE:
            assert f"{total * replicas:,} over the {replicas} pods" in text
