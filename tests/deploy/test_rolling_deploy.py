"""docker/deploy/rolling-deploy.sh: shellcheck-clean, and the rollout it performs is
rolling: new workers must be healthy before old ones are stopped with their full grace
period, and a failed health check leaves the old workers running.

The script runs for real under bash against tests/deploy/fake_docker.py on PATH.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.support import DEPLOY_SCRIPT, run_tool

FAKE_DOCKER = Path(__file__).with_name("fake_docker.py")
OLD_WORKER_IMAGE = "ghcr.io/acme/jobyard/worker@sha256:" + "a" * 64
NEW_WORKER_IMAGE = "ghcr.io/acme/jobyard/worker@sha256:" + "b" * 64
OLD_TEMPORAL_IMAGE = "ghcr.io/acme/jobyard/temporal-worker@sha256:" + "c" * 64
NEW_TEMPORAL_IMAGE = "ghcr.io/acme/jobyard/temporal-worker@sha256:" + "d" * 64


def container(
    container_id: str, service: str, image: str, stop_timeout: int | None = 45
) -> dict[str, Any]:
    return {
        "id": container_id,
        "service": service,
        "image": image,
        "status": "running",
        "health": "healthy",
        "stop_timeout": stop_timeout,
        "inspections": 1,
    }


def running_old_stack(worker_stop_timeout: int | None = 45) -> list[dict[str, Any]]:
    return [
        container("worker-old-1", "worker", OLD_WORKER_IMAGE, worker_stop_timeout),
        container("worker-old-2", "worker", OLD_WORKER_IMAGE, worker_stop_timeout),
        container("temporal-worker-old-1", "temporal-worker", OLD_TEMPORAL_IMAGE),
    ]


@dataclass
class Deploy:
    returncode: int
    output: str
    containers: list[dict[str, Any]]
    calls: list[list[str]]

    def of(self, service: str) -> list[dict[str, Any]]:
        return [c for c in self.containers if c["service"] == service]

    def index(self, predicate: Callable[[list[str]], bool]) -> list[int]:
        return [i for i, call in enumerate(self.calls) if predicate(call)]

    def stops(self) -> dict[str, str]:
        """Container id -> the --time it was stopped with."""
        return {call[-1]: call[2] for call in self.calls if call[:2] == ["stop", "--time"]}


@pytest.fixture
def deploy(tmp_path: Path) -> Callable[..., Deploy]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"
    docker.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_DOCKER}" "$@"\n')
    docker.chmod(0o755)
    state_file = tmp_path / "docker-state.json"

    def run(containers: list[dict[str, Any]] | None = None, *args: str, **env: str) -> Deploy:
        state_file.write_text(
            json.dumps({"containers": containers or [], "calls": [], "next_id": 0})
        )
        result = subprocess.run(
            ["bash", str(DEPLOY_SCRIPT), *args],
            env={
                "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                "FAKE_DOCKER_STATE": str(state_file),
                "JOBYARD_WORKER_IMAGE": NEW_WORKER_IMAGE,
                "JOBYARD_TEMPORAL_WORKER_IMAGE": NEW_TEMPORAL_IMAGE,
                "POSTGRES_PASSWORD": "s3cret",
                "HEALTH_POLL_INTERVAL": "0.05",
                "HEALTH_TIMEOUT": "5",
                **env,
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        state = json.loads(state_file.read_text())
        return Deploy(
            result.returncode, result.stdout + result.stderr, state["containers"], state["calls"]
        )

    return run


def test_shellcheck_finds_nothing() -> None:
    result = run_tool("shellcheck", "--severity=style", "--shell=bash", DEPLOY_SCRIPT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_does_flag_a_bad_script(tmp_path: Path) -> None:
    """Guards the test above: shellcheck must really be checking."""
    bad = tmp_path / "bad.sh"
    bad.write_text('#!/usr/bin/env bash\nids=$(docker ps -q)\ndocker stop $ids\ncd "$1"\n')
    result = run_tool("shellcheck", "--severity=style", bad)
    assert result.returncode != 0
    assert "SC2086" in result.stdout and "SC2164" in result.stdout, result.stdout


def test_script_is_executable() -> None:
    assert os.access(DEPLOY_SCRIPT, os.X_OK)


def test_new_workers_replace_old_ones_once_healthy(deploy: Callable[..., Deploy]) -> None:
    result = deploy(running_old_stack(), WORKER_REPLICAS="3")

    assert result.returncode == 0, result.output
    workers = result.of("worker")
    assert len(workers) == 3
    assert {w["image"] for w in workers} == {NEW_WORKER_IMAGE}
    assert all(w["status"] == "running" for w in workers)
    assert [w["image"] for w in result.of("temporal-worker")] == [NEW_TEMPORAL_IMAGE]


def test_old_workers_stop_only_after_every_new_one_is_healthy(
    deploy: Callable[..., Deploy],
) -> None:
    result = deploy(running_old_stack(), WORKER_REPLICAS="3")
    assert result.returncode == 0, result.output

    new_ids = {c["id"] for c in result.of("worker")}
    last_new_health_check = max(
        result.index(lambda call: call[0] == "inspect" and call[-1] in new_ids)
    )
    first_old_stop = min(
        result.index(lambda call: call[0] == "stop" and call[-1].startswith("worker-old"))
    )
    assert last_new_health_check < first_old_stop
    # Both old workers were stopped, each with the full grace compose gave it.
    assert {k: v for k, v in result.stops().items() if "worker-old" in k} == {
        "worker-old-1": "45",
        "worker-old-2": "45",
        "temporal-worker-old-1": "45",
    }


def test_the_migration_runs_before_any_new_worker_starts(deploy: Callable[..., Deploy]) -> None:
    result = deploy(running_old_stack())
    assert result.returncode == 0, result.output
    migrate = result.index(lambda call: call[:2] == ["compose", "--file"] and "run" in call)
    first_scale = min(result.index(lambda call: "--scale" in call))
    assert len(migrate) == 1 and migrate[0] < first_scale
    assert result.calls[migrate[0]][-1] == "migrate"


def test_scale_up_keeps_old_containers_and_skips_dependencies(
    deploy: Callable[..., Deploy],
) -> None:
    result = deploy(running_old_stack(), WORKER_REPLICAS="3")
    scale_call = result.calls[min(result.index(lambda call: "--scale" in call))]
    assert "--no-recreate" in scale_call and "--no-deps" in scale_call
    # Two old ones running, three wanted: compose is asked for 2 + 3.
    assert "worker=5" in scale_call


def test_stop_timeout_comes_from_the_container(deploy: Callable[..., Deploy]) -> None:
    result = deploy(running_old_stack(worker_stop_timeout=90))
    assert result.returncode == 0, result.output
    assert result.stops()["worker-old-1"] == "90"


def test_stop_timeout_falls_back_when_the_container_has_none(
    deploy: Callable[..., Deploy],
) -> None:
    result = deploy(running_old_stack(worker_stop_timeout=None), STOP_GRACE_SECONDS="50")
    assert result.returncode == 0, result.output
    assert result.stops()["worker-old-1"] == "50"


def _old_stack_untouched(result: Deploy) -> None:
    assert sorted(c["id"] for c in result.containers) == [
        "temporal-worker-old-1",
        "worker-old-1",
        "worker-old-2",
    ]
    assert all(c["status"] == "running" for c in result.containers)
    assert {c["image"] for c in result.of("worker")} == {OLD_WORKER_IMAGE}
    assert not [stopped for stopped in result.stops() if "old" in stopped]


def test_unhealthy_new_workers_are_rolled_back_and_old_ones_keep_running(
    deploy: Callable[..., Deploy],
) -> None:
    result = deploy(running_old_stack(), WORKER_REPLICAS="3", FAKE_NEW_HEALTH="unhealthy")

    assert result.returncode != 0
    _old_stack_untouched(result)
    # The new workers were stopped gracefully too: they may have taken jobs already.
    assert set(result.stops().values()) == {"45"}
    assert len(result.stops()) == 3
    # A failed worker rollout stops the deploy: the Temporal worker is not touched.
    assert not result.index(lambda call: "temporal-worker=2" in call)
    assert "rolling back" in result.output


def test_new_workers_that_never_become_healthy_are_rolled_back(
    deploy: Callable[..., Deploy],
) -> None:
    result = deploy(running_old_stack(), FAKE_NEW_HEALTH="starting", HEALTH_TIMEOUT="1")
    assert result.returncode != 0
    _old_stack_untouched(result)
    assert "not healthy after 1s" in result.output


def test_a_scale_up_failing_half_way_is_rolled_back(deploy: Callable[..., Deploy]) -> None:
    result = deploy(running_old_stack(), WORKER_REPLICAS="2", FAKE_SCALE_EXIT="1")
    assert result.returncode != 0
    _old_stack_untouched(result)


def test_a_failed_migration_starts_no_new_worker(deploy: Callable[..., Deploy]) -> None:
    result = deploy(running_old_stack(), FAKE_MIGRATE_EXIT="1")
    assert result.returncode != 0
    _old_stack_untouched(result)
    assert not result.index(lambda call: "--scale" in call)


def test_first_deploy_starts_workers_without_stopping_anything(
    deploy: Callable[..., Deploy],
) -> None:
    result = deploy([], WORKER_REPLICAS="2")
    assert result.returncode == 0, result.output
    assert len(result.of("worker")) == 2
    assert len(result.of("temporal-worker")) == 1
    assert result.stops() == {}


def test_scaling_down_ends_with_the_requested_count(deploy: Callable[..., Deploy]) -> None:
    result = deploy(running_old_stack(), WORKER_REPLICAS="1")
    assert result.returncode == 0, result.output
    assert [w["image"] for w in result.of("worker")] == [NEW_WORKER_IMAGE]


@pytest.mark.parametrize("replicas", ["0", "-1", "two", ""])
def test_invalid_replica_counts_are_refused_before_touching_docker(
    deploy: Callable[..., Deploy], replicas: str
) -> None:
    result = deploy(running_old_stack(), WORKER_REPLICAS=replicas)
    if replicas == "":
        # Empty means unset (an unset GitHub secret): the default of one worker.
        assert result.returncode == 0, result.output
        assert len(result.of("worker")) == 1
        return
    assert result.returncode != 0
    assert "WORKER_REPLICAS must be a positive integer" in result.output
    assert result.calls == []


def test_missing_image_is_refused(deploy: Callable[..., Deploy]) -> None:
    result = deploy(running_old_stack(), JOBYARD_WORKER_IMAGE="")
    assert result.returncode != 0
    assert "JOBYARD_WORKER_IMAGE is not set" in result.output
    assert result.calls == []


def test_only_the_named_services_are_rolled(deploy: Callable[..., Deploy]) -> None:
    result = deploy(running_old_stack(), "temporal-worker")
    assert result.returncode == 0, result.output
    assert {c["image"] for c in result.of("worker")} == {OLD_WORKER_IMAGE}
    assert [c["image"] for c in result.of("temporal-worker")] == [NEW_TEMPORAL_IMAGE]
