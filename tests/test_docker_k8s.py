"""deploy/k8s against a named Kubernetes release's API schema, and the pod's security context
against the one compose runs the server with (which tests/test_docker_engine.py checks on a
real engine, down to the kernel's view of the server process).

The validator is PyPI kubernetes-validate (pinned in scripts/install-test-tools.sh), strict:
an unknown field is an error, as `kubectl apply --validate=strict` would make it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml
from support.deploy import ROOT, tool

K8S = ROOT / "deploy" / "k8s"
KUBERNETES_RELEASE = "1.31.0"  # native gRPC probes (GA in 1.27) and everything else used here


def validate(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("kubernetes-validate"), "--kubernetes-version", KUBERNETES_RELEASE, "--strict",
         *map(str, files)],
        capture_output=True, text=True, timeout=120, check=False,
    )


def test_every_manifest_validates_against_the_release_schema() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert listed, "kustomization lists no resources"
    result = validate(*(K8S / name for name in listed))
    assert result.returncode == 0, result.stdout + result.stderr
    for name in listed:  # each one checked against a schema, not skipped for want of one
        assert f"{K8S / name} passed for resource" in result.stdout + result.stderr, name


def test_validation_rejects_a_misspelled_security_field(tmp_path: Path) -> None:
    text = (K8S / "deployment.yaml").read_text()
    assert text.count("readOnlyRootFilesystem") >= 1
    bad = tmp_path / "deployment.yaml"
    bad.write_text(text.replace("readOnlyRootFilesystem", "readOnlyRootFileSystem"))
    result = validate(bad)
    assert result.returncode != 0
    assert "readOnlyRootFileSystem" in result.stdout + result.stderr


def server_security(pod: dict[str, Any]) -> dict[str, Any]:
    container = next(c for c in pod["containers"] if c["name"] == "server")
    return {"pod": pod["securityContext"], "container": container["securityContext"],
            "tmp": any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])}


def test_compose_runs_the_server_with_the_pod_security_context() -> None:
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    k8s = server_security(deployment["spec"]["template"]["spec"])
    server = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["server"]
    dockerfile = (ROOT / "Dockerfile").read_text()

    assert k8s["pod"]["runAsNonRoot"] is True
    user = f"{k8s['pod']['runAsUser']}:{k8s['pod']['runAsGroup']}"
    assert f"\nUSER {user}\n" in dockerfile
    assert "user" not in server
    assert k8s["container"]["readOnlyRootFilesystem"] is server["read_only"] is True
    assert k8s["container"]["capabilities"]["drop"] == server["cap_drop"] == ["ALL"]
    assert "cap_add" not in server
    assert k8s["container"]["allowPrivilegeEscalation"] is False
    assert "no-new-privileges:true" in server["security_opt"]
    assert k8s["pod"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert not any("seccomp" in o for o in server["security_opt"])  # Docker's default profile
    assert k8s["tmp"]
    assert "/tmp" in server["tmpfs"]
