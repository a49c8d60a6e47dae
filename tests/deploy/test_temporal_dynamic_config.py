"""docker/temporal/dynamicconfig.yaml, the compose Temporal server's dynamic config, orders task
priorities as the dev server of `jobyard dev` and the tests does (DEV_SERVER_PRIORITY_FLAGS,
measured in tests/test_flow_temporal_priority.py), and compose mounts it where it points the
server."""

from __future__ import annotations

from typing import Any

import yaml

from jobyard.dispatcher.engines.temporal.engine import DEV_SERVER_PRIORITY_FLAGS
from tests.deploy.support import COMPOSE_FILE, load_yaml

DYNAMIC_CONFIG = COMPOSE_FILE.parent / "temporal" / "dynamicconfig.yaml"


def dev_server_values() -> dict[str, Any]:
    """The flags' `key=value`s, the values read as YAML reads them (true, 201)."""
    pairs = (flag.partition("=") for flag in DEV_SERVER_PRIORITY_FLAGS[1::2])
    return {key: yaml.safe_load(text) for key, _, text in pairs}


def test_the_compose_server_orders_priorities_as_the_dev_server() -> None:
    config = load_yaml(DYNAMIC_CONFIG)
    assert {key: [{"value": value}] for key, value in dev_server_values().items()} == config


def test_compose_points_the_server_at_the_mounted_dynamic_config() -> None:
    temporal = load_yaml(COMPOSE_FILE)["services"]["temporal"]
    path = temporal["environment"]["DYNAMIC_CONFIG_FILE_PATH"]
    assert f"./temporal/dynamicconfig.yaml:{path}:ro" in temporal["volumes"]
    assert temporal["image"].startswith("temporalio/server:1.32.")
