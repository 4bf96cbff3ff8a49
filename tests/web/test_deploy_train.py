"""deploy/train: the multi-node training Job is valid Kubernetes and runs a command torchrun and the trainer accept."""
from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import yaml
from torch.distributed.run import get_args_parser

from app.trainer.__main__ import build_parser

from .test_deploy_tools import K8S_VERSIONS, run, tool

TRAIN = Path(__file__).resolve().parents[2] / "deploy" / "train"
RESOURCES = [d for p in sorted(TRAIN.glob("*.yaml")) if p.name != "kustomization.yaml"
             for d in yaml.safe_load_all(p.read_text()) if d]


def resource(kind: str) -> dict:
    return next(d for d in RESOURCES if d["kind"] == kind)


def test_kustomize_build_is_valid_kubernetes():
    docs = [d for d in yaml.safe_load_all(run(tool("kubectl"), "kustomize", TRAIN)) if d]
    assert sorted(d["kind"] for d in docs) == sorted(d["kind"] for d in RESOURCES)
    for doc in docs:
        assert doc["metadata"]["namespace"] == "dmp"
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)  # raises on any unknown or mistyped field


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((TRAIN / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in TRAIN.glob("*.yaml")
                                                          if p.name != "kustomization.yaml")


def test_job_command_is_a_two_node_torchrun_of_the_trainer():
    job, service = resource("Job"), resource("Service")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    run = get_args_parser().parse_args(container["command"][1:])
    assert container["command"][0] == "torchrun" and run.module and run.training_script == "app.trainer"
    train = build_parser().parse_args(run.training_script_args)  # exits (SystemExit) on an unknown flag
    assert train.command == "patch" and train.batch_size % (int(run.nnodes) * int(run.nproc_per_node)) == 0
    # One pod per node, all at once, and as many ranks per pod as it has GPUs.
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == int(run.nnodes) == 2
    assert int(run.nproc_per_node) == container["resources"]["limits"]["nvidia.com/gpu"] == 8
    # The c10d rendezvous is pod 0's stable DNS name through the headless Service, on the port it exposes.
    assert run.rdzv_backend == "c10d"
    host, port = run.rdzv_endpoint.split(":")
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert pod["subdomain"] == service["metadata"]["name"] and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    # Checkpoint, base and data on the volume every node mounts.
    shared = {m["mountPath"] for m in container["volumeMounts"] if m["name"] == "shared"}.pop()
    claim = next(v for v in pod["volumes"] if v["name"] == "shared")["persistentVolumeClaim"]["claimName"]
    assert resource("PersistentVolumeClaim")["metadata"]["name"] == claim
    assert "ReadWriteMany" in resource("PersistentVolumeClaim")["spec"]["accessModes"]
    assert all(p.startswith(shared) for p in (train.out, train.base, train.dataset.removeprefix("folder:")))


def test_network_policy_lets_the_trainers_reach_each_other():
    """The namespace denies by default; rendezvous, store and NCCL ports are chosen at run time, so no port list."""
    pods = resource("Job")["spec"]["template"]["metadata"]["labels"]
    policy = resource("NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pods.items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    (ingress,), (egress,) = policy["ingress"], policy["egress"]
    assert "ports" not in ingress and "ports" not in egress
    assert [p["podSelector"]["matchLabels"] for p in ingress["from"]] == [policy["podSelector"]["matchLabels"]]
    assert [p["podSelector"]["matchLabels"] for p in egress["to"]] == [policy["podSelector"]["matchLabels"]]
