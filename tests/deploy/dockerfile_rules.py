"""What docker/Dockerfile must get right, beyond what hadolint checks.

A small parser (stages, instructions, line continuations) is enough: the rules are about
which instructions a final target ends up with once its stage chain is followed
(`FROM runtime AS worker` inherits USER, HEALTHCHECK and STOPSIGNAL from `runtime`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# name:tag@sha256:<64 hex>; the tag names a patch release (3.11.14, 0.13.0).
PINNED_IMAGE = re.compile(r"^[\w./-]+:\d+\.\d+\.\d+[\w.-]*@sha256:[0-9a-f]{64}$")
ROOT_USERS = {"root", "0", "0:0", "root:root"}


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse_stages(text: str) -> list[Stage]:
    """Stages in order; each instruction as (KEYWORD, arguments)."""
    stages: list[Stage] = []
    for keyword, arguments in _instructions(text):
        if keyword == "FROM":
            words = arguments.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif stages:
            stages[-1].instructions.append((keyword, arguments))
    return stages


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    instructions = []
    for line in joined.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        keyword, _, arguments = stripped.partition(" ")
        instructions.append((keyword.upper(), " ".join(arguments.split())))
    return instructions


def stage_chain(stages: list[Stage], target: str) -> list[Stage]:
    """The target stage and the stages it is built FROM, base first."""
    by_name = {stage.name: stage for stage in stages if stage.name}
    if target not in by_name:
        raise KeyError(f"no stage named {target!r}")
    chain = [by_name[target]]
    while chain[0].base in by_name:
        chain.insert(0, by_name[chain[0].base])
    return chain


def last_instruction(chain: list[Stage], keyword: str) -> str | None:
    found = None
    for stage in chain:
        for instruction, arguments in stage.instructions:
            if instruction == keyword:
                found = arguments
    return found


def external_images(stages: list[Stage]) -> list[str]:
    """Images pulled from a registry: FROM bases and COPY --from sources that are not
    stages of this Dockerfile."""
    names = {stage.name for stage in stages if stage.name}
    images = [stage.base for stage in stages if stage.base not in names]
    for stage in stages:
        for keyword, arguments in stage.instructions:
            source = re.match(r"--from=(\S+)", arguments) if keyword == "COPY" else None
            if source and source[1] not in names and not source[1].isdigit():
                images.append(source[1])
    return images


def target_problems(stages: list[Stage], target: str, health_command: str) -> list[str]:
    try:
        chain = stage_chain(stages, target)
    except KeyError as exc:
        return [f"{target}: {exc.args[0]}"]
    problems = []
    user = last_instruction(chain, "USER")
    if user is None or user.strip() in ROOT_USERS:
        problems.append(f"{target}: runs as root (no non-root USER)")
    healthcheck = last_instruction(chain, "HEALTHCHECK")
    if healthcheck is None or "NONE" in healthcheck.split():
        problems.append(f"{target}: no HEALTHCHECK")
    elif not healthcheck.endswith(f"CMD {health_command}"):
        problems.append(f"{target}: HEALTHCHECK is not {health_command}: {healthcheck}")
    stopsignal = last_instruction(chain, "STOPSIGNAL")
    if stopsignal != "SIGTERM":
        problems.append(f"{target}: STOPSIGNAL is {stopsignal!r}, workers drain on SIGTERM")
    if last_instruction(chain, "CMD") is None:
        problems.append(f"{target}: no CMD")
    return problems


def dependency_layer_problems(stages: list[Stage]) -> list[str]:
    """Every `uv sync` installs exactly the lock file's production set, and the third-party
    dependencies get a layer of their own before the source is copied in, so a source
    change does not reinstall them."""
    problems = []
    cached_dependency_layer = False
    for stage in stages:
        copied_source = False
        for keyword, arguments in stage.instructions:
            if keyword == "COPY" and _copies_source(arguments):
                copied_source = True
            if keyword != "RUN" or "uv sync" not in arguments:
                continue
            if "--frozen" not in arguments or "--no-dev" not in arguments:
                problems.append(f"`uv sync` without --frozen --no-dev: {arguments}")
            if not copied_source and "--no-install-workspace" in arguments:
                cached_dependency_layer = True
    if not cached_dependency_layer:
        problems.append(
            "no `uv sync --no-install-workspace` dependency layer before the source is copied"
        )
    return problems


def _copies_source(copy_arguments: str) -> bool:
    """A COPY from the build context of anything but dependency metadata."""
    words = copy_arguments.split()
    if any(word.startswith("--from") for word in words):
        return False
    sources = [word for word in words if not word.startswith("--")][:-1]
    return any(not source.endswith(("pyproject.toml", "uv.lock")) for source in sources)


def dockerfile_problems(text: str, health_commands: dict[str, str]) -> list[str]:
    """Problems of the Dockerfile; health_commands maps each target to its HEALTHCHECK
    command in exec form."""
    stages = parse_stages(text)
    problems = []
    for image in external_images(stages):
        if not PINNED_IMAGE.match(image):
            problems.append(f"image {image!r} is not pinned by patch tag and digest")
    if not any(image.startswith("ghcr.io/astral-sh/uv:") for image in external_images(stages)):
        problems.append("uv does not come from the pinned ghcr.io/astral-sh/uv image")
    problems += dependency_layer_problems(stages)
    for target, health_command in health_commands.items():
        problems += target_problems(stages, target, health_command)
    return problems
