"""The Kubernetes manifests: valid against the Kubernetes JSON schemas (offline, strict), and
consistent with what forkd-controller accepts."""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import kubernetes_validate as kv  # dev extra: the Kubernetes JSON schemas, bundled for offline use
import pytest
import yaml

from forkd.daemon.auth import load_token
from forkd.daemon.main import serve
from forkd.errors import ValidationError

K8S_DIR = Path(__file__).resolve().parents[2] / "packaging" / "k8s"
MANIFESTS = sorted(K8S_DIR.glob("*.yaml"))
K8S_VERSION = "1.33"
WORKLOADS = ("Deployment", "DaemonSet")


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def by_kind(path: Path, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs(path) if d["kind"] == kind]
    return doc


def workload(path: Path) -> dict[str, Any]:
    (doc,) = [d for d in docs(path) if d["kind"] in WORKLOADS]
    return doc


def container(path: Path) -> dict[str, Any]:
    (c,) = workload(path)["spec"]["template"]["spec"]["containers"]
    return c


def test_both_manifests_exist() -> None:
    assert [p.name for p in MANIFESTS] == ["forkd-controller-daemonset.yaml", "forkd-controller.yaml"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_document_validates_strictly(path: Path) -> None:
    kinds = []
    for doc in docs(path):
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{path.name}: {doc['kind']} {'.'.join(str(x) for x in e.path)}: {e.message}")
        kinds.append(doc["kind"])
    assert {"Namespace", "Secret", "Service"} <= set(kinds)
    assert len(kinds) >= 4, kinds


def test_strict_validation_rejects_unknown_fields() -> None:
    """Guards the test itself: a misspelt field must not pass."""
    doc = copy.deepcopy(workload(K8S_DIR / "forkd-controller.yaml"))
    doc["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kv.ValidationError):
        kv.validate(doc, K8S_VERSION, strict=True)


def test_deployment_shape() -> None:
    path = K8S_DIR / "forkd-controller.yaml"
    dep = workload(path)
    assert dep["kind"] == "Deployment"
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"]["type"] == "Recreate"
    pod = dep["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["kubernetes.io/arch"] == "amd64"
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {by_kind(path, "PersistentVolumeClaim")["metadata"]["name"]}
    svc = by_kind(path, "Service")
    assert svc["spec"]["type"] == "ClusterIP"
    assert [p["port"] for p in svc["spec"]["ports"]] == [8889]


def test_daemonset_shape() -> None:
    path = K8S_DIR / "forkd-controller-daemonset.yaml"
    ds = workload(path)
    assert ds["kind"] == "DaemonSet"
    pod = ds["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["forkd.io/kvm"] == "true"
    state = {v["name"]: v for v in pod["volumes"]}["state"]
    assert state["hostPath"]["path"] == "/var/lib/forkd"
    assert not [d for d in docs(path) if d["kind"] == "PersistentVolumeClaim"]
    assert by_kind(path, "Service")["spec"]["clusterIP"] == "None"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_placeholder_token_is_refused_by_the_daemon(path: Path, tmp_path: Path) -> None:
    secret = by_kind(path, "Secret")
    if "stringData" in secret:
        token = secret["stringData"]["token"].encode()
    else:
        token = base64.b64decode(secret["data"]["token"])
    assert token.startswith(b"REPLACE_ME")
    f = tmp_path / "token"
    f.write_bytes(token + b"\n")
    f.chmod(0o600)
    with pytest.raises(ValidationError, match="placeholder"):
        load_token(f)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_probes_hit_healthz_on_the_container_port(path: Path) -> None:
    c = container(path)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8889}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/healthz", probe  # the only path that needs no token
        assert get["port"] in ("http", 8889), probe


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_container_args_are_flags_serve_accepts(path: Path) -> None:
    c = container(path)
    assert c["command"] == ["forkd-controller"]
    args = c["args"]
    assert args[0] == "serve"
    accepted = {opt for p in serve.params for opt in getattr(p, "opts", [])}
    flags = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args[1:]}
    assert all(a.startswith("--") and "=" in a for a in args[1:]), args
    assert set(flags) <= accepted, set(flags) - accepted
    assert flags["--bind"] == "0.0.0.0:8889"
    # the token file is in the Secret's mount, the state on the persistent volume
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/etc/forkd"]["readOnly"] is True
    assert flags["--token-file"] == "/etc/forkd/token"
    for flag in ("--state", "--snapshot-root", "--audit-log"):
        assert flags[flag].startswith("/var/lib/forkd/"), flag
    assert "/var/lib/forkd" in mounts


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_token_volume_mode_is_one_the_daemon_accepts(path: Path) -> None:
    pod = workload(path)["spec"]["template"]["spec"]
    (vol,) = [v for v in pod["volumes"] if "secret" in v]
    assert vol["secret"]["secretName"] == by_kind(path, "Secret")["metadata"]["name"]
    assert vol["secret"]["defaultMode"] == 0o400
    # fsGroup would add group read (0440): load_token refuses a token readable by the group
    assert "fsGroup" not in pod.get("securityContext", {})


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kvm_and_cgroup_host_paths(path: Path) -> None:
    pod = workload(path)["spec"]["template"]["spec"]
    host = {v["hostPath"]["path"]: v["hostPath"].get("type") for v in pod["volumes"] if "hostPath" in v}
    assert host["/dev/kvm"] == "CharDevice"
    assert host["/sys/fs/cgroup"] == "Directory"
    assert container(path)["securityContext"]["privileged"] is True
