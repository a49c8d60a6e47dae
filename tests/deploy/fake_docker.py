"""A stand-in for the `docker` CLI, so rolling-deploy.sh can be run on a machine with no
Docker engine. It models just enough of docker and docker compose for a rollout:
containers per service with an image, a state and a health, and it records every call.

The state lives in a JSON file named by FAKE_DOCKER_STATE:
  {"containers": [{"id", "service", "image", "status", "health", "stop_timeout"}],
   "calls": [[argv...], ...], "next_id": int}

How new containers behave comes from the environment:
  FAKE_NEW_HEALTH   health new containers reach: healthy (default) or unhealthy. They
                    report `starting` on their first inspection, like a real one.
  FAKE_MIGRATE_EXIT exit status of `compose run ... migrate` (default 0).
  FAKE_SCALE_EXIT   exit status of `compose up --scale` after creating (default 0).

Like compose, `up --scale` without --no-recreate recreates the existing containers
from the new image: a script that forgot the flag would lose its old workers at once.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

# The image compose takes for each service: what the deploy exported.
SERVICE_IMAGE_VARIABLE = {
    "worker": "JOBYARD_WORKER_IMAGE",
    "migrate": "JOBYARD_WORKER_IMAGE",
    "temporal-worker": "JOBYARD_TEMPORAL_WORKER_IMAGE",
}


def main(argv: list[str]) -> int:
    state_path = Path(os.environ["FAKE_DOCKER_STATE"])
    state = json.loads(state_path.read_text())
    state["calls"].append(argv)
    try:
        return dispatch(state, argv)
    finally:
        state_path.write_text(json.dumps(state, indent=1))


def dispatch(state: dict[str, Any], argv: list[str]) -> int:
    command, *args = argv
    if command == "compose":
        return compose(state, args)
    if command == "inspect":
        return inspect(state, args)
    if command == "stop":
        return stop(state, args)
    if command == "rm":
        ids = set(args)
        state["containers"] = [c for c in state["containers"] if c["id"] not in ids]
        return 0
    print(f"fake docker: unsupported command {argv}", file=sys.stderr)
    return 2


def compose(state: dict[str, Any], args: list[str]) -> int:
    # Global options first: --file <path>.
    while args and args[0] == "--file":
        args = args[2:]
    subcommand, *rest = args
    if subcommand == "pull":
        return 0
    if subcommand == "run":
        return int(os.environ.get("FAKE_MIGRATE_EXIT", "0"))
    if subcommand == "ps":
        service = rest[-1]
        for container in state["containers"]:
            if container["service"] == service:
                print(container["id"])
        return 0
    if subcommand == "up":
        scale = next((rest[i + 1] for i, arg in enumerate(rest) if arg == "--scale"), None)
        if scale is not None:
            service, _, count = scale.partition("=")
            return scale_service(state, service, int(count), "--no-recreate" in rest)
        return 0  # infrastructure: assumed up and healthy
    print(f"fake docker: unsupported compose command {args}", file=sys.stderr)
    return 2


def scale_service(state: dict[str, Any], service: str, count: int, no_recreate: bool) -> int:
    image = os.environ[SERVICE_IMAGE_VARIABLE[service]]
    existing = [c for c in state["containers"] if c["service"] == service]
    if not no_recreate:
        for container in existing:
            container.update(image=image, health="starting", inspections=0)
    for _ in range(count - len(existing)):
        state["next_id"] += 1
        state["containers"].append(
            {
                "id": f"{service}-new-{state['next_id']}",
                "service": service,
                "image": image,
                "status": "running",
                "health": os.environ.get("FAKE_NEW_HEALTH", "healthy"),
                "stop_timeout": 45,
                "inspections": 0,
            }
        )
    return int(os.environ.get("FAKE_SCALE_EXIT", "0"))


def inspect(state: dict[str, Any], args: list[str]) -> int:
    template, container_id = args[args.index("--format") + 1], args[-1]
    container = next((c for c in state["containers"] if c["id"] == container_id), None)
    if container is None:
        print(f"Error: No such object: {container_id}", file=sys.stderr)
        return 1
    if "StopTimeout" in template:
        timeout = container.get("stop_timeout")
        print("<nil>" if timeout is None else timeout)
        return 0
    if "State.Status" in template:
        container["inspections"] = container.get("inspections", 0) + 1
        health = container["health"]
        if container["inspections"] == 1 and health != "none":
            health = "starting"
        print(f"{container['status']} {health}")
        return 0
    print(f"fake docker: unsupported inspect template {template}", file=sys.stderr)
    return 2


def stop(state: dict[str, Any], args: list[str]) -> int:
    for container in state["containers"]:
        if container["id"] in args:
            container["status"] = "exited"
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
