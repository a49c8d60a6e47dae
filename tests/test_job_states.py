"""Job states are spelled once, in `JobState`; jobyard.lua keeps its own copies of the strings
(Lua cannot import the enum), so every state string it uses is checked against the enum here."""

from __future__ import annotations

import ast
import re

from jobyard.dispatcher.models import JobStatus
from jobyard.job_engine import JobState
from jobyard.job_engine.db.models import FINAL_JOB_STATES, JOB_STATES
from jobyard.job_engine.states import FINAL_STATES, UNFINISHED_STATES
from tests.support import ROOT

LUA = ROOT / "packages/queue/src/jobyard/queue/jobyard.lua"

#: `local job = redis.call("hmget", key, "engine", "state", ...)`: which element is the state.
_HMGET = re.compile(r'local (\w+) = [^\n]*?redis\.call\("hmget", \w+,((?:\s*"\w+",?)+)\)')


def lua_state_strings(text: str) -> dict[str, set[str]]:
    """Each state string jobyard.lua uses, with where: the header's list of states, the
    TERMINAL table, values written to a `state` field, and literals compared with a state read
    by `hmget` (the element whose field is "state", per command)."""
    found: dict[str, set[str]] = {}

    def add(where: str, state: str) -> None:
        found.setdefault(state, set()).add(where)

    header = re.search(r"--\s+state:\s+([a-z_ |]+)\n", text)
    assert header, "jobyard.lua's key layout no longer lists the states"
    for state in header.group(1).split("|"):
        add("header", state.strip())
    terminal = re.search(r"local TERMINAL = \{([^}]*)\}", text)
    assert terminal, "jobyard.lua has no TERMINAL table"
    for state in re.findall(r"(\w+) = true", terminal.group(1)):
        add("TERMINAL", state)
    writes = re.sub(r'redis\.call\("hmget"[^)]*\)', "", text)  # its field lists name "state"
    for state in re.findall(r'"state", "(\w+)"', writes):
        add("written", state)
    # One block per command; a variable's hmget layout holds from where it is read on.
    for block in re.split(r'\n(?:else)?if command == "', text):
        layouts = sorted(
            (m.start(), m.group(1), re.findall(r'"(\w+)"', m.group(2)))
            for m in _HMGET.finditer(block)
        )
        for at, var, fields in layouts:
            if "state" not in fields:
                continue
            index = fields.index("state") + 1  # Lua arrays count from 1
            rest = block[at:]
            later = [s for s, v, _ in layouts if v == var and s > at]
            if later:
                rest = block[at : later[0]]
            pattern = rf'{var}\[{index}\]\s*[=~]=\s*"(\w+)"'
            for state in re.findall(pattern, rest):
                add("compared", state)
    return found


def test_every_state_jobyard_lua_uses_is_a_job_state() -> None:
    found = lua_state_strings(LUA.read_text())
    unknown = {state: where for state, where in found.items() if state not in set(JobState)}
    assert not unknown, f"jobyard.lua uses states JobState does not have: {unknown}"
    # The reader finds what it looks for: every state is in the header, and the comparisons
    # and writes were seen (a reader that found nothing would pass the check above).
    assert set(found) == set(JobState)
    compared = {s for s, where in found.items() if "compared" in where}
    written = {s for s, where in found.items() if "written" in where}
    assert {"queued", "running", "succeeded"} <= compared, compared
    assert {"queued", "running", "cancelled", "succeeded"} <= written, written


def test_the_reader_catches_a_misspelt_state() -> None:
    text = LUA.read_text()
    doctored = text.replace('job[2] ~= "queued"', 'job[2] ~= "queueing"', 1)
    assert doctored != text
    assert "queueing" in lua_state_strings(doctored)
    doctored = text.replace('"state", "cancelled"', '"state", "canceled"', 1)
    assert "canceled" in lua_state_strings(doctored)


def test_the_job_log_and_the_enum_agree() -> None:
    assert set(JOB_STATES) == set(JobState)
    assert set(FINAL_JOB_STATES) == FINAL_STATES
    assert set(UNFINISHED_STATES) | FINAL_STATES == set(JobState)


def test_job_status_holds_the_enum() -> None:
    status = JobStatus("j1", "dramatiq", "succeeded", 1)  # type: ignore[arg-type]
    assert status.state is JobState.SUCCEEDED and status.state == "succeeded"
    assert status.as_dict()["state"] == "succeeded"
    try:
        JobStatus("j1", "dramatiq", "finished", 1)  # type: ignore[arg-type]
    except ValueError as exc:
        assert "finished" in str(exc)
    else:
        raise AssertionError("an unknown state was accepted")


#: A state written as a string literal where the code sets, compares or reports a job's state.
_STATE_LITERAL = re.compile(
    r"""(?:\bstate\s*(?:==|!=|=)\s*|["']state["']\s*:\s*|\b(?:finish|event|reschedule)\(\s*)"""
    r"""["'](?P<state>[a-z]+)["']"""
)
#: Files whose `state` is another thing's: a schedule tick's, frozen migrations.
_OTHER_STATES = ("dispatcher/scheduling/ticks.py", "/migrations/versions/")


def _docstring_lines(text: str) -> set[int]:
    """Line numbers of the module's, classes' and functions' docstrings."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(text)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                lines.update(range(value.lineno, (value.end_lineno or value.lineno) + 1))
    return lines


def test_python_code_spells_job_states_through_the_enum() -> None:
    """The enum is the one spelling: a literal "dead" in an engine is a second one that no
    rename of the enum would reach. (Comments and docstrings may name states.)"""
    known = {state.value for state in JobState}
    found = []
    for path in sorted([*(ROOT / "packages").rglob("*.py"), *(ROOT / "apps").rglob("*.py")]):
        where = path.relative_to(ROOT).as_posix()
        if any(part in where for part in _OTHER_STATES) or where.endswith("states.py"):
            continue
        text = path.read_text()
        prose = _docstring_lines(text)
        for number, line in enumerate(text.splitlines(), 1):
            if number in prose:
                continue
            code = line.split("#", 1)[0]
            for match in _STATE_LITERAL.finditer(code):
                if match["state"] in known:
                    found.append(f"{where}:{number}: {line.strip()}")
    assert not found, "job states spelled as literals, use JobState:\n" + "\n".join(found)
