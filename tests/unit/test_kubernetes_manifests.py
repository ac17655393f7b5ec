"""The Kubernetes manifests: valid for a pinned Kubernetes version, and locked down.

Validation runs offline against the JSON schemas bundled in ``kubernetes-validate``
(strict: an unknown field, such as a misspelt one, is an error).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML reads the manifests (dev extra)")

KUBERNETES_VERSION = "1.30.0"
MANIFESTS = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
KUSTOMIZATION = "kustomization.yaml"
EXAMPLE_SECRET = "secret-database.example.yaml"
IMAGE = "ghcr.io/fedge/fedge:0.1.0"
GATEWAY_PORT = 9443
METRICS_PORT = 9400
VOLUME_PATH = "/var/lib/fedge"
DEPLOYMENT_DIR = f"{VOLUME_PATH}/server"

Document = dict[str, Any]


def _documents(path: Path) -> list[Document]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def _manifest_files() -> list[Path]:
    return sorted(path for path in MANIFESTS.glob("*.yaml") if path.name != KUSTOMIZATION)


def _all_documents() -> Iterator[tuple[Path, Document]]:
    for path in _manifest_files():
        for document in _documents(path):
            yield path, document


def _only(kind: str, name: str | None = None) -> Document:
    found = [
        doc
        for _, doc in _all_documents()
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _pod_spec() -> Document:
    spec: Document = _only("StatefulSet")["spec"]["template"]["spec"]
    return spec


def _containers(pod: Document) -> list[Document]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def _server(pod: Document) -> Document:
    (server,) = (c for c in pod["containers"] if c["name"] == "server")
    container: Document = server
    return container


@pytest.mark.parametrize(
    ("path", "index"),
    [
        pytest.param(path, index, id=f"{path.name}[{index}]")
        for path in _manifest_files()
        for index in range(len(_documents(path)))
    ],
)
def test_every_manifest_validates_against_the_pinned_kubernetes_schema(
    path: Path, index: int
) -> None:
    validator = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (dev extra) is not installed"
    )
    document = _documents(path)[index]

    validated = validator.validate(document, KUBERNETES_VERSION, strict=True)

    assert validated == "1.30"


def test_the_validator_catches_a_misspelt_field() -> None:
    validator = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (dev extra) is not installed"
    )
    statefulset = _only("StatefulSet")
    broken = {**statefulset, "spec": {**statefulset["spec"], "replica": 1}}

    with pytest.raises(validator.ValidationError, match=r"replica"):
        validator.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    (kustomization,) = _documents(MANIFESTS / KUSTOMIZATION)
    expected = {path.name for path in _manifest_files()} - {EXAMPLE_SECRET}

    assert kustomization["kind"] == "Kustomization"
    assert kustomization["namespace"] == "fedge"
    assert sorted(kustomization["resources"]) == sorted(expected)
    assert all((MANIFESTS / name).is_file() for name in kustomization["resources"])


def test_every_namespaced_object_lives_in_the_fedge_namespace() -> None:
    namespace = _only("Namespace")
    assert namespace["metadata"]["name"] == "fedge"
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for path, document in _all_documents():
        if document["kind"] != "Namespace":
            assert document["metadata"].get("namespace") == "fedge", path.name


def test_one_server_pod_owns_the_volume() -> None:
    statefulset = _only("StatefulSet")
    claim = _only("PersistentVolumeClaim")
    pod = _pod_spec()

    assert statefulset["spec"]["replicas"] == 1
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    (data,) = (v for v in pod["volumes"] if "persistentVolumeClaim" in v)
    assert data["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    for container in _containers(pod):
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts[VOLUME_PATH] == data["name"], container["name"]


def test_the_pod_runs_non_root_without_privileges() -> None:
    pod = _pod_spec()
    pod_context = pod["securityContext"]

    assert pod_context["runAsNonRoot"] is True
    assert pod_context["runAsUser"] != 0
    assert pod_context["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    assert not any(pod.get(flag) for flag in ("hostNetwork", "hostPID", "hostIPC"))
    assert all("hostPath" not in volume for volume in pod["volumes"])
    for container in _containers(pod):
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True, container["name"]
        assert context.get("runAsUser", pod_context["runAsUser"]) != 0, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context.get("privileged", False) is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
        assert "add" not in context["capabilities"], container["name"]
        assert container["image"] == IMAGE, container["name"]
        assert container["resources"]["limits"]["memory"], container["name"]
        assert container["resources"]["requests"]["cpu"], container["name"]


def test_the_service_account_carries_no_token() -> None:
    account = _only("ServiceAccount")

    assert account["automountServiceAccountToken"] is False
    assert _pod_spec()["serviceAccountName"] == account["metadata"]["name"]


def test_the_init_container_creates_the_deployment_only_when_it_has_no_config() -> None:
    (init,) = _pod_spec()["initContainers"]
    script = init["command"][-1]
    env = {item["name"]: item for item in init["env"]}

    assert env["FEDGE_DEPLOYMENT"]["value"] == DEPLOYMENT_DIR
    assert 'if [ -f "$config" ]' in script
    assert script.index('if [ -f "$config" ]') < script.index("fedge server init")
    assert 'config="$FEDGE_DEPLOYMENT/fedge-server.toml"' in script
    assert '--san "$FEDGE_SAN"' in script
    assert '--database-url "$FEDGE_DATABASE_URL"' in script


def test_the_database_url_comes_from_the_example_secret_and_is_optional() -> None:
    secret = _only("Secret")
    (init,) = _pod_spec()["initContainers"]
    (url,) = (item for item in init["env"] if item["name"] == "FEDGE_DATABASE_URL")
    reference = url["valueFrom"]["secretKeyRef"]

    assert reference["name"] == secret["metadata"]["name"]
    assert reference["key"] in secret["stringData"]
    # Without the Secret the deployment uses SQLite on the volume.
    assert reference["optional"] is True
    assert "CHANGE-ME" in secret["stringData"][reference["key"]]


def test_the_server_starts_the_deployment_and_is_probed_over_https() -> None:
    pod = _pod_spec()
    server = _server(pod)
    ports = {port["name"]: port["containerPort"] for port in server["ports"]}

    assert server["command"] == ["fedge", "server", "start", DEPLOYMENT_DIR]
    assert ports == {"gateway": GATEWAY_PORT, "metrics": METRICS_PORT}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        check = server[probe]["httpGet"]
        assert check["path"] == "/healthz", probe
        assert check["scheme"] == "HTTPS", probe
        assert ports[check["port"]] == GATEWAY_PORT, probe
    # Long enough for the run to be recorded as interrupted after SIGTERM.
    assert pod["terminationGracePeriodSeconds"] >= 60


def test_only_the_gateway_port_is_exposed_publicly() -> None:
    services = [doc for _, doc in _all_documents() if doc["kind"] == "Service"]
    public = [s for s in services if s["spec"].get("type", "ClusterIP") != "ClusterIP"]
    pod_labels = _only("StatefulSet")["spec"]["template"]["metadata"]["labels"]

    (gateway,) = public
    assert gateway["spec"]["type"] == "LoadBalancer"
    assert [(p["port"], p["targetPort"]) for p in gateway["spec"]["ports"]] == [
        (GATEWAY_PORT, "gateway")
    ]
    for service in services:
        assert service["spec"]["selector"].items() <= pod_labels.items()


def test_metrics_are_cluster_internal_and_annotated_for_prometheus() -> None:
    metrics = _only("Service", "fedge-metrics")
    annotations = metrics["metadata"]["annotations"]

    assert metrics["spec"]["type"] == "ClusterIP"
    assert [(p["port"], p["targetPort"]) for p in metrics["spec"]["ports"]] == [
        (METRICS_PORT, "metrics")
    ]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_the_network_policy_admits_the_gateway_and_monitoring_only() -> None:
    policy = _only("NetworkPolicy")["spec"]
    pod_labels = _only("StatefulSet")["spec"]["template"]["metadata"]["labels"]

    assert policy["policyTypes"] == ["Ingress"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    rules = {
        tuple(port["port"] for port in rule["ports"]): rule.get("from")
        for rule in policy["ingress"]
    }
    assert set(rules) == {(GATEWAY_PORT,), (METRICS_PORT,)}
    assert rules[(GATEWAY_PORT,)] is None  # devices connect from anywhere
    (monitoring,) = rules[(METRICS_PORT,)]
    assert monitoring == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    }
