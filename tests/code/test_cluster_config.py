"""cluster.yaml against Ray's own cluster-config schema, the way `ray up` prepares and validates it, plus
the properties users rely on: GPU workers that scale past one, S3 storage on every node, nothing but SSH
opened, token authentication on."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).parents[2] / "cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_ray_accepts_the_cluster_config(config):
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does before validating
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] == "head"


def test_the_schema_check_rejects_a_broken_config(config):
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["max_worker"] = 4  # misspelt key
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_gpu_workers_autoscale_from_zero_past_one(config):
    gpu_types = {
        name: node
        for name, node in config["available_node_types"].items()
        if node["node_config"]["InstanceType"].startswith(("g", "p"))
    }
    assert gpu_types, "no GPU worker type"
    for node in gpu_types.values():
        assert node["min_workers"] == 0
    assert max(node["max_workers"] for node in gpu_types.values()) > 1
    assert config["max_workers"] >= sum(node["max_workers"] for node in gpu_types.values())
    assert "--gpus all" in config["docker"]["worker_run_options"]


def test_every_node_stores_on_s3_with_an_instance_profile(config):
    setup = "\n".join(config["setup_commands"])
    assert "LXN_STORAGE=s3://" in setup and "RAY_AUTH_MODE=token" in setup
    for command in [*config["head_start_ray_commands"], *config["worker_start_ray_commands"]]:
        if "ray start" in command:
            assert "source ~/.bashrc" in command  # Ray processes inherit LXN_STORAGE
    for node in config["available_node_types"].values():
        assert node["node_config"]["IamInstanceProfile"]["Name"]
    assert "pip install" in setup and "/home/ray/lxn_ray" in setup
    assert config["file_mounts"]["/home/ray/lxn_ray"] == "."  # the checked-out version


def test_only_ssh_is_opened_and_never_to_the_world(config):
    permissions = config["provider"]["security_group"]["IpPermissions"]
    assert [(p["FromPort"], p["ToPort"]) for p in permissions] == [(22, 22)]
    for permission in permissions:
        assert all(r["CidrIp"] != "0.0.0.0/0" for r in permission["IpRanges"])
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
