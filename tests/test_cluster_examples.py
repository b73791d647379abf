"""examples/cluster/: the Ray launcher config validates against the schema Ray ships; the
SkyPilot tasks are checked for the keys and commands they rely on (SkyPilot's own package,
too heavy for CI, accepted them in a separate environment: see the README)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import ray
import yaml

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "cluster"
SKY_TOP = {"name", "workdir", "num_nodes", "resources", "envs", "secrets", "file_mounts",
           "setup", "run", "config"}
SKY_RESOURCES = {"accelerators", "cloud", "region", "zone", "instance_type", "use_spot",
                 "disk_size", "cpus", "memory", "ports", "image_id", "any_of", "ordered"}


def test_the_ray_launcher_config_is_valid_for_ray() -> None:
    config = yaml.safe_load((EXAMPLES / "ray-cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json")
                        .read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    classes = {k for t in types.values() for k in t["resources"] if k not in ("GPU", "CPU")}
    assert classes == {"fast", "big"}  # one custom resource per kind of GPU node
    assert sum(t.get("max_workers", 0) for t in types.values()) <= config["max_workers"]
    assert any("overnight[ray]" in c for c in config["setup_commands"])
    assert "overnight run --executor ray" in (EXAMPLES / "ray-cluster.yaml").read_text()


def test_the_skypilot_tasks_use_only_keys_skypilot_knows() -> None:
    head = yaml.safe_load((EXAMPLES / "skypilot.yaml").read_text())
    workers = yaml.safe_load((EXAMPLES / "skypilot-workers.yaml").read_text())
    for task in (head, workers):
        assert set(task) <= SKY_TOP, set(task) - SKY_TOP
        assert set(task["resources"]) <= SKY_RESOURCES
        name, count = task["resources"]["accelerators"].split(":")
        assert name in ("H100", "H200") and int(count) > 0
        assert "overnight[ray]" in task["setup"]
    assert "SKYPILOT_NODE_RANK" in head["run"] and "ray start --head" in head["run"]
    assert "overnight run --executor ray" in head["run"]
    assert '--address="$HEAD_IP:6379"' in workers["run"] and "HEAD_IP" in workers["envs"]
