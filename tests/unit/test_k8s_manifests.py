"""The Kubernetes manifests: valid against the Kubernetes JSON schemas (offline, strict), and
consistent with what forkd-controller accepts, with the container image (packaging/container/) and
with the capabilities scripts/container-check.sh ran the jail with."""

from __future__ import annotations

import base64
import copy
import inspect
import re
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate as kv  # dev extra: the Kubernetes JSON schemas, bundled for offline use
import pytest
import yaml

from forkd.cli.snapshot_cmd import create as snapshot_create
from forkd.daemon.auth import load_token
from forkd.daemon.main import serve
from forkd.engine.engine import Engine
from forkd.errors import ValidationError

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "packaging" / "k8s"
DOCKERFILE = ROOT / "packaging" / "container" / "Dockerfile"
CHECK_SCRIPT = ROOT / "scripts" / "container-check.sh"
MANIFESTS = sorted(K8S_DIR.glob("*.yaml"))
DEPLOYMENT = K8S_DIR / "forkd-controller.yaml"
DAEMONSET = K8S_DIR / "forkd-controller-daemonset.yaml"
STATEFULSET = K8S_DIR / "forkd-controller-statefulset.yaml"
UNPRIVILEGED = [DEPLOYMENT, STATEFULSET]
K8S_VERSION = "1.33"
WORKLOADS = ("Deployment", "DaemonSet", "StatefulSet")
STATE_PATH = "/var/lib/forkd"

#: The first start's budget besides what the code's defaults give (docs/deployment.md, "Kubernetes"):
#: a guest image rebuild when the node's TSC rate differs from the build host's (18 s measured here
#: plus the download) and the one ping reconcile gives a recorded sandbox whose QEMU is alive
#: (none survives a container restart, so this is only a margin).
IMAGE_REBUILD_S = 120
RECONCILE_PING_S = 30


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def by_kind(path: Path, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs(path) if d["kind"] == kind]
    return doc


def workload(path: Path) -> dict[str, Any]:
    (doc,) = [d for d in docs(path) if d["kind"] in WORKLOADS]
    return doc


def pod_spec(path: Path) -> dict[str, Any]:
    return workload(path)["spec"]["template"]["spec"]


def container(path: Path) -> dict[str, Any]:
    (c,) = pod_spec(path)["containers"]
    return c


def dockerfile_instruction(name: str) -> list[str]:
    """Every value of instruction ``name`` in the Dockerfile (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line.split(None, 1)[1].strip() for line in text.splitlines() if line.split(None, 1)[:1] == [name]]


def check_script_caps() -> set[str]:
    return set(re.findall(r"--cap-add=([A-Z_]+)", CHECK_SCRIPT.read_text()))


def check_script_image() -> str:
    m = re.search(r"^IMAGE=\$\{FORKD_CONTAINER_IMAGE:-([^}]+)\}", CHECK_SCRIPT.read_text(), re.M)
    assert m, "scripts/container-check.sh sets no default IMAGE"
    return m.group(1)


def test_the_manifests_exist() -> None:
    assert [p.name for p in MANIFESTS] == ["forkd-controller-daemonset.yaml", "forkd-controller-statefulset.yaml",
                                           "forkd-controller.yaml"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_document_validates_strictly(path: Path) -> None:
    kinds = []
    for doc in docs(path):
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{path.name}: {doc['kind']} {'.'.join(str(x) for x in e.path)}: {e.message}")
        kinds.append(doc["kind"])
    assert {"Namespace", "Secret", "Service", "NetworkPolicy"} <= set(kinds)
    assert len(kinds) >= 5, kinds


def test_strict_validation_rejects_unknown_fields() -> None:
    """Guards the test itself: a misspelt field must not pass."""
    doc = copy.deepcopy(workload(DEPLOYMENT))
    doc["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kv.ValidationError):
        kv.validate(doc, K8S_VERSION, strict=True)


def test_deployment_shape() -> None:
    dep = workload(DEPLOYMENT)
    assert dep["kind"] == "Deployment"
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"]["type"] == "Recreate"
    pod = dep["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["kubernetes.io/arch"] == "amd64"
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {by_kind(DEPLOYMENT, "PersistentVolumeClaim")["metadata"]["name"]}
    svc = by_kind(DEPLOYMENT, "Service")
    assert svc["spec"]["type"] == "ClusterIP"
    assert [p["port"] for p in svc["spec"]["ports"]] == [8889]


def test_daemonset_shape() -> None:
    ds = workload(DAEMONSET)
    assert ds["kind"] == "DaemonSet"
    pod = ds["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["forkd.io/kvm"] == "true"
    state = {v["name"]: v for v in pod["volumes"]}["state"]
    assert state["hostPath"]["path"] == STATE_PATH
    assert not [d for d in docs(DAEMONSET) if d["kind"] == "PersistentVolumeClaim"]
    assert by_kind(DAEMONSET, "Service")["spec"]["clusterIP"] == "None"


def test_statefulset_shape() -> None:
    sts = workload(STATEFULSET)
    assert sts["kind"] == "StatefulSet"
    svc = by_kind(STATEFULSET, "Service")
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    assert svc["spec"]["clusterIP"] == "None"
    assert sts["spec"]["updateStrategy"]["type"] == "OnDelete"
    (template,) = sts["spec"]["volumeClaimTemplates"]
    assert template["spec"]["accessModes"] == ["ReadWriteOnce"]
    pod = sts["spec"]["template"]["spec"]
    assert not [v for v in pod["volumes"] if v["name"] == template["metadata"]["name"]]  # from the template
    (term,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == sts["spec"]["template"]["metadata"]["labels"]


def test_statefulset_runs_the_deployments_container() -> None:
    """One Pod definition, two ways to store its state: the containers must not drift apart."""
    assert container(STATEFULSET) == container(DEPLOYMENT)
    for key in ("nodeSelector", "tolerations", "terminationGracePeriodSeconds"):
        assert pod_spec(STATEFULSET)[key] == pod_spec(DEPLOYMENT)[key], key


@pytest.mark.parametrize("path", [DEPLOYMENT, STATEFULSET], ids=lambda p: p.name)
def test_the_state_path_is_on_a_persistent_volume_claim(path: Path) -> None:
    c = container(path)
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == STATE_PATH]
    wl = workload(path)
    pvc_volumes = {v["name"] for v in wl["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v}
    templates = {t["metadata"]["name"] for t in wl["spec"].get("volumeClaimTemplates", [])}
    assert mount["name"] in pvc_volumes | templates
    assert not mount.get("readOnly", False)


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


def first_start_budget_s(c: dict[str, Any]) -> float:
    """The longest a first start may take before /healthz answers: the entrypoint (guest image
    rebuild, snapshot creation with the code's boot timeout and settle time) and reconcile."""
    env = {e["name"]: e.get("value", "") for e in c.get("env", [])}
    boot = next(p.default for p in snapshot_create.params if p.name == "boot_timeout")
    args = shlex.split(env.get("FORKD_SNAPSHOT_ARGS", ""))
    for i, a in enumerate(args):
        if a == "--boot-timeout":
            boot = float(args[i + 1])
        elif a.startswith("--boot-timeout="):
            boot = float(a.split("=", 1)[1])
    settle = inspect.signature(Engine.create_snapshot).parameters["settle_max_s"].default
    snapshot = boot + settle if env.get("FORKD_SNAPSHOT_TAG", "pyagent") else 0.0
    return IMAGE_REBUILD_S + snapshot + RECONCILE_PING_S


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_startup_probe_covers_the_first_start(path: Path) -> None:
    c = container(path)
    probe = c["startupProbe"]
    window = probe["periodSeconds"] * probe["failureThreshold"]
    budget = first_start_budget_s(c)
    assert budget >= 500  # 120 + 300 + 60 + 30 with today's defaults: the probe is not sized for less
    assert window >= budget, f"startupProbe gives {window} s, the first start may take {budget} s"
    assert window <= 2 * budget, "a stuck start should not go unnoticed for much longer than needed"
    assert probe.get("timeoutSeconds", 1) >= 3


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_container_runs_the_image_entrypoint_then_serve(path: Path) -> None:
    c = container(path)
    (entrypoint,) = dockerfile_instruction("ENTRYPOINT")
    assert c["command"] == yaml.safe_load(entrypoint)  # the JSON form: the entrypoint's setup always runs
    args = c["args"]
    assert args[:2] == ["forkd-controller", "serve"]
    accepted = {opt for p in serve.params for opt in getattr(p, "opts", [])}
    flags = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args[2:]}
    assert all(a.startswith("--") and "=" in a for a in args[2:]), args
    assert set(flags) <= accepted, set(flags) - accepted
    assert flags["--bind"] == "0.0.0.0:8889"
    # the token file is in the Secret's mount, the state on the state volume
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/etc/forkd"]["readOnly"] is True
    assert flags["--token-file"] == "/etc/forkd/token"
    for flag in ("--state", "--snapshot-root", "--audit-log"):
        assert flags[flag].startswith(STATE_PATH + "/"), flag
    assert STATE_PATH in mounts


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_image_is_the_one_the_build_script_makes(path: Path) -> None:
    from forkd import __version__

    image = check_script_image()
    assert container(path)["image"] == image
    assert image.rsplit(":", 1)[1] == __version__
    assert container(path)["imagePullPolicy"] == "IfNotPresent"


def test_dockerfile_matches_the_manifests() -> None:
    assert any(a.startswith("BASE_IMAGE=") for a in dockerfile_instruction("ARG"))
    assert dockerfile_instruction("FROM") == ["${BASE_IMAGE}"]
    assert dockerfile_instruction("VOLUME") == [STATE_PATH]
    assert dockerfile_instruction("EXPOSE") == [str(container(DEPLOYMENT)["ports"][0]["containerPort"])]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_network_policy_admits_only_the_container_ports(path: Path) -> None:
    np = by_kind(path, "NetworkPolicy")
    wl = workload(path)
    assert np["metadata"]["namespace"] == wl["metadata"]["namespace"]
    labels = wl["spec"]["template"]["metadata"]["labels"]
    assert np["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert np["spec"]["policyTypes"] == ["Ingress"]
    c = container(path)
    by_name = {p["name"]: p["containerPort"] for p in c["ports"]}
    container_ports = {(p["containerPort"], p.get("protocol", "TCP")) for p in c["ports"]}
    allowed = set()
    assert np["spec"]["ingress"], "an empty ingress list would admit nothing"
    for rule in np["spec"]["ingress"]:
        assert rule.get("ports"), "a rule without ports admits every port"
        assert rule.get("from"), "a rule without from admits everyone"
        for p in rule["ports"]:
            number = by_name.get(p["port"], p["port"])
            allowed.add((number, p.get("protocol", "TCP")))
    assert allowed == container_ports
    # the Service sends clients to those ports only
    svc = by_kind(path, "Service")
    assert {by_name.get(p["targetPort"], p["targetPort"]) for p in svc["spec"]["ports"]} == {n for n, _ in allowed}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_token_volume_mode_is_one_the_daemon_accepts(path: Path) -> None:
    pod = pod_spec(path)
    (vol,) = [v for v in pod["volumes"] if "secret" in v]
    assert vol["secret"]["secretName"] == by_kind(path, "Secret")["metadata"]["name"]
    assert vol["secret"]["defaultMode"] == 0o400
    # fsGroup would add group read (0440): load_token refuses a token readable by the group
    assert "fsGroup" not in pod.get("securityContext", {})


@pytest.mark.parametrize("path", UNPRIVILEGED, ids=lambda p: p.name)
def test_unprivileged_pods_get_the_capabilities_the_jail_was_run_with(path: Path) -> None:
    sc = container(path)["securityContext"]
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["runAsUser"] == 0  # the jail setuid()s every QEMU to a uid of its own
    assert sc["capabilities"]["drop"] == ["ALL"]
    added = set(sc["capabilities"]["add"])
    assert added == check_script_caps(), "the manifest and scripts/container-check.sh must agree"
    # what jail.can_jail() insists on, and what the jail's other steps use
    assert {"SETUID", "SETGID", "SYS_CHROOT", "SYS_ADMIN", "SETPCAP"} <= added
    assert {"NET_ADMIN", "SYS_PTRACE", "KILL"} <= added
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert sc["appArmorProfile"]["type"] == "Unconfined"  # the jail calls mount()
    assert not [v for v in pod_spec(path)["volumes"] if "hostPath" in v], "no node paths without privileges"


def test_daemonset_takes_the_nodes_kvm_and_cgroups() -> None:
    host = {v["hostPath"]["path"]: v["hostPath"].get("type") for v in pod_spec(DAEMONSET)["volumes"]
            if "hostPath" in v}
    assert host["/dev/kvm"] == "CharDevice"
    assert host["/sys/fs/cgroup"] == "Directory"
    assert container(DAEMONSET)["securityContext"]["privileged"] is True
