"""The Kubernetes kernel: the kernelspec gateway-provisioners' own installer writes, our pod template
in it, rendered by gateway-provisioners' own launcher code and checked against the Kubernetes API
schema (kubernetes-validate, offline). No cluster runs here: nothing is applied."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
pytest.importorskip("kubernetes")
pytest.importorskip("gateway_provisioners")

K8S_VERSION = "1.30.0"
IMAGE = "registry.example.com/dhvm-kernel:0.1.0"


def _install(tmp_path: Path, kvm: str) -> Path:
    from dhg_kernel.cluster import install_kubernetes

    return Path(install_kubernetes(IMAGE, f"dhvm-k8s-{kvm}", kvm=kvm, home_claim="team-dhg", prefix=str(tmp_path)))


def _render(spec_dir: Path, kernel_id: str = "0f8e2c1a-0000-4000-8000-000000000001") -> dict:
    """The pod as gateway-provisioners' launcher renders it: its own generate_kernel_pod_yaml over the
    template in the kernelspec, with the KERNEL_* values the KubernetesProvisioner and the spec give."""
    script = spec_dir / "scripts" / "launch_kubernetes.py"
    mod_spec = importlib.util.spec_from_file_location(f"launch_kubernetes_{spec_dir.name}", script)
    launcher = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(launcher)
    spec = json.loads((spec_dir / "kernel.json").read_text())
    env = {**spec["env"], "KERNEL_ID": kernel_id, "KERNEL_POD_NAME": f"jovyan-{kernel_id}",
           "KERNEL_NAMESPACE": "notebooks", "KERNEL_IMAGE": spec["metadata"]["kernel_provisioner"]["config"]["image_name"],
           "KERNEL_SERVICE_ACCOUNT_NAME": "default", "KERNEL_WORKING_DIR": "/home/jovyan/work"}
    keywords = {k.lower(): yaml.safe_load(v) for k, v in env.items() if k.startswith("KERNEL_")}
    docs = [d for d in yaml.safe_load_all(launcher.generate_kernel_pod_yaml(keywords)) if d]
    assert len(docs) == 1 and docs[0]["kind"] == "Pod"
    return docs[0]


def _validate(pod: dict) -> None:
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_the_kernelspec_is_gateway_provisioners_own_with_our_pod_template_and_kernel_class(tmp_path):
    d = _install(tmp_path, "device-plugin")
    spec = json.loads((d / "kernel.json").read_text())
    prov = spec["metadata"]["kernel_provisioner"]
    assert prov["provisioner_name"] == "kubernetes-provisioner" and prov["config"]["image_name"] == IMAGE
    assert spec["argv"][1] == str(d / "scripts" / "launch_kubernetes.py")
    assert spec["argv"][spec["argv"].index("--kernel-class-name") + 1] == "dhg_kernel.kernel.DhvmKernel"
    assert spec["env"] == {"KERNEL_DHVM_KVM": "device-plugin", "KERNEL_DHVM_HOME_CLAIM": "team-dhg",
                           "KERNEL_DHVM_BACKEND": "firecracker"}
    assert "devices.kubevirt.io/kvm" in (d / "scripts" / "kernel-pod.yaml.j2").read_text()


def test_device_plugin_pod_renders_valid_unprivileged_and_asks_for_kvm(tmp_path):
    pod = _render(_install(tmp_path, "device-plugin"))
    _validate(pod)
    kernel = pod["spec"]["containers"][0]
    assert kernel["image"] == IMAGE and kernel["workingDir"] == "/home/jovyan/work"
    assert kernel["resources"]["limits"]["devices.kubevirt.io/kvm"] == "1"
    assert kernel["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    assert not any(v.get("hostPath") for v in pod["spec"]["volumes"])
    assert pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "team-dhg"
    env = {e["name"]: e.get("value") for e in kernel["env"]}
    assert env["DHG_HOME"] == "/dhg" and env["DHG_BACKEND"] == "firecracker"
    prepare = pod["spec"]["initContainers"][0]
    assert prepare["command"] == ["dhvm", "prepare", "--backend", "firecracker"]


def test_privileged_fallback_renders_valid_and_mounts_the_nodes_kvm(tmp_path):
    pod = _render(_install(tmp_path, "privileged"))
    _validate(pod)
    kernel = pod["spec"]["containers"][0]
    assert kernel["securityContext"] == {"privileged": True}
    assert "devices.kubevirt.io/kvm" not in kernel["resources"]["limits"]
    kvm = [v for v in pod["spec"]["volumes"] if v["name"] == "dev-kvm"]
    assert kvm == [{"name": "dev-kvm", "hostPath": {"path": "/dev/kvm", "type": "CharDevice"}}]
    assert {"name": "dev-kvm", "mountPath": "/dev/kvm"} in kernel["volumeMounts"]


def test_the_schema_check_can_fail(tmp_path):
    pod = _render(_install(tmp_path, "device-plugin"))
    broken = copy.deepcopy(pod)
    broken["spec"]["containers"][0]["resources"]["limits"]["memory"] = {"not": "a quantity"}
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(broken)
    broken = copy.deepcopy(pod)
    broken["spec"]["containers"][0]["securityContex"] = {"privileged": True}  # a typo: strict mode refuses it
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(broken)


def test_bad_kubernetes_options_are_refused_with_the_fix(tmp_path):
    from dhg_kernel.cluster import install_kubernetes
    from dhg_kernel.errors import UsageError

    with pytest.raises(UsageError, match="device-plugin, privileged"):
        install_kubernetes(IMAGE, kvm="hostpath", prefix=str(tmp_path))
    with pytest.raises(UsageError, match="k8s/Dockerfile"):
        install_kubernetes("", prefix=str(tmp_path))


def test_the_image_definition_installs_what_the_pod_runs():
    dockerfile = (Path(__file__).resolve().parents[2] / "k8s" / "Dockerfile").read_text()
    assert "jupyter-image-bootstrap install --languages Python" in dockerfile  # /usr/local/bin/bootstrap-kernel.sh
    assert "KERNEL_CLASS_NAME=dhg_kernel.kernel.DhvmKernel" in dockerfile
    assert "[cluster]" in dockerfile and "DHG_HOME=/dhg" in dockerfile
    from dhg_kernel.cluster import pod_template

    assert '"dhvm", "prepare"' in pod_template().read_text()
