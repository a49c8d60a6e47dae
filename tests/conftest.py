"""Shared fixtures: a Temporal dev server per session; per test, a private redis-server, a fresh
Temporal task queue, and the environment jobyard's processes read. Every test is marked with its
tier (unit, integration, acceptance: tier_of below); `make test-fast` runs the unit tier."""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests import support
from tests.engines import Engines
from tests.support import (
    ROOT,
    RedisServer,
    TemporalDevServer,
    migrated_pg_database,
    reset_process_state,
)

WEBHOOK_SECRET = "test-webhook-secret"


@pytest.fixture(scope="session")
def temporal_server() -> Iterator[TemporalDevServer]:
    server = TemporalDevServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def job_log_database(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An SQLite job log shared by the session's processes (WAL lets them write at once)."""
    from jobyard.job_engine.db.migrate import upgrade

    url = f"sqlite:///{tmp_path_factory.mktemp('joblog') / 'jobyard.db'}"
    upgrade(url)
    return url


@pytest.fixture(scope="session")
def job_log_db_url() -> Iterator[str]:
    """A PostgreSQL job log for the session, migrated to head (`tests/api` empties it per test)."""
    with migrated_pg_database("jobyard_test_api") as url:
        yield url


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


def jobyard_values(
    redis_server: RedisServer, temporal_server: TemporalDevServer, job_log_database: str
) -> dict[str, str]:
    """The environment of a test's jobyard processes: its own Redis and Temporal task queue."""
    return {
        "REDIS_URL": redis_server.url,
        "TEMPORAL_ADDRESS": temporal_server.address,
        "TEMPORAL_TASK_QUEUE": f"test-{uuid.uuid4().hex[:12]}",
        "USE_DRAMATIQ": "true",
        "WORKER_HEARTBEAT_INTERVAL": "0.5",
        "WORKER_HEARTBEAT_TIMEOUT": "3",
        # What in-flight jobs get when a test's workers stop: the teardown waits for it, and
        # no test here needs it (tests/test_shutdown.py sets its own).
        "WORKER_SHUTDOWN_GRACE": "1",
        "WORKER_CONCURRENCY_DEFAULT": "4",
        "JOBYARD_JOB_MODULES": "tests.jobs",
        "JOBYARD_BREAKER_PROBE_INTERVAL": "0.2",
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        # test receivers listen on loopback, which webhooks reach only when allow-listed
        "JOBYARD_WEBHOOK_ALLOW": "127.0.0.1",
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": job_log_database,
        "JOBYARD_JOB_LOG_INTERVAL": "0.1",
        "WORKER_METRICS_PORT": "0",
        "TEMPORAL_WORKER_METRICS_PORT": "0",  # a test that scrapes it gives a free port
        "JOBYARD_SCHEDULER": "false",  # a test that wants schedules firing turns it on
    }


@pytest.fixture
def jobyard_env(
    monkeypatch: pytest.MonkeyPatch,
    redis_server: RedisServer,
    temporal_server: TemporalDevServer,
    job_log_database: str,
) -> Iterator[dict[str, str]]:
    """Point every jobyard process of this test at its own Redis and task queue."""
    values = jobyard_values(redis_server, temporal_server, job_log_database)
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    reset_process_state()
    yield values
    reset_process_state()


@pytest.fixture
def engines(jobyard_env: dict[str, str], redis_server: RedisServer) -> Iterator[Engines]:
    engines = Engines(redis_server)
    yield engines
    engines.close()


class ModuleEngines:
    """A module's Redis, settings and workers, shared by its `shared_engines` tests."""

    def __init__(self, redis_server: RedisServer, values: dict[str, str]) -> None:
        self.redis = redis_server
        self.values = values
        self.engines = Engines(redis_server)


@pytest.fixture(scope="module")
def shared_settings() -> dict[str, str]:
    """What a directory's or module's shared workers add to jobyard_values (override it)."""
    return {}


@pytest.fixture(scope="module")
def module_engines(
    temporal_server: TemporalDevServer, job_log_database: str, shared_settings: dict[str, str]
) -> Iterator[ModuleEngines]:
    redis_server = RedisServer().start()
    values = jobyard_values(redis_server, temporal_server, job_log_database)
    shared = ModuleEngines(redis_server, {**values, **shared_settings})
    try:
        yield shared
    finally:
        shared.engines.close()
        redis_server.stop()


@pytest.fixture
def shared_engines(
    monkeypatch: pytest.MonkeyPatch, module_engines: ModuleEngines
) -> Iterator[Engines]:
    """`engines` whose Redis, task queue and workers the module's tests share: a worker's
    start-up and stop (3-4 s each test) happen once per module. For tests that only run jobs
    (their own job ids and marker directories) with the module's settings: a test that kills,
    pauses or reconfigures its workers or its Redis, or counts what is in Redis, takes
    `engines`. Workers start on first use, with the environment of that moment."""
    for key, value in module_engines.values.items():
        monkeypatch.setenv(key, value)
    engines = module_engines.engines
    for attr in ("worker", "temporal_worker"):  # one that died is started again on use
        proc = getattr(engines, attr)
        if proc is not None and proc.proc.poll() is not None:
            setattr(engines, attr, None)
    reset_process_state()
    yield engines
    reset_process_state()


#: Tests of 9 s and more (measured on the 2-core machine, `--durations`), run first: pytest-xdist
#: hands tests out in collection order, and one of these at the end leaves the other core idle.
LONG_FIRST = (
    "tests/test_cli.py::test_commands_exit_cleanly_fifty_times_each",
    "tests/test_schedules_processes.py::",
    "tests/test_tracing.py::test_a_job_moved_from_dramatiq_to_temporal_is_one_trace",
    "tests/api/test_schemathesis.py::",
    "tests/test_fallback.py::test_queued_jobs_move_to_temporal_when_their_workers_die",
    "tests/api/test_events.py::test_every_progress_report_and_state_is_an_event_however_fast",
    "tests/test_durability.py::test_killed_worker_resumes_after_finished_steps",
    "tests/faults/test_faults_ci.py::",
    "tests/api/test_readable_states.py::test_a_parked_job_is_sleeping_until_its_wake_time",
    "tests/test_schedules.py::test_overlap_skip_with_a_job_longer_than_the_period",
    "tests/test_schedules.py::test_schedules_commands_pause_resume_trigger_backfill",
    "tests/test_dispatch_many.py::test_jobs_redis_lost_after_dispatch_many_are_dispatched_again",
    "tests/test_fallback.py::test_jobs_redis_lost_are_dispatched_again_from_the_job_log",
    "tests/test_django.py::test_the_backend_on_django6_and_python312",
    "tests/catalogue/test_ai.py::test_sixty_first_call_in_a_minute_is_never_sent",
    "tests/test_shipper.py::test_the_log_of_a_finished_job_survives_its_worker_killed",
    "tests/api/test_events.py::test_events_of_a_job_moved_from_dramatiq_to_temporal",
    "tests/test_event_matching.py::test_no_event_missed_none_twice_the_first_found_stands",
)


#: The test tiers (README, Development). `unit`: in this process, no server, no program run
#: whole (`make test-fast`). `integration`: a real Redis, PostgreSQL or Temporal dev server.
#: `acceptance`: jobyard's programs run whole as processes (workers, the CLI, the scheduler, the
#: deploy script, the built wheel), against real servers where they need them.
UNIT, INTEGRATION, ACCEPTANCE = "unit", "integration", "acceptance"

#: Fixtures that start or reach a server: a test using one, directly or through another
#: fixture, is integration at least.
SERVER_FIXTURES = frozenset(
    {"redis_server", "temporal_server", "job_log_db_url", "pg_url", "fresh_pg_url"}
) | {"sentinel_cluster", "tls_sentinel_cluster"}  # tests/test_sentinel.py: a primary, a
# replica, three Sentinels (over TLS)
#: Fixtures that start jobyard's processes (or hand a test the means to): acceptance.
PROCESS_FIXTURES = frozenset({"engines", "shared_engines", "module_engines"}) | {
    "sentinel_engines",
    "tls_sentinel_engines",
    "tls_server_engines",  # tests/test_sentinel.py
}
#: Fixture parameters that pick a server (fixtures that call request.getfixturevalue, which
#: the fixture closure cannot see): (fixture, parameter) -> tier.
PARAMETER_TIERS = {
    ("database", "pg"): INTEGRATION,
    ("database", "postgresql"): INTEGRATION,
    ("url", "postgresql"): INTEGRATION,  # tests/test_flow_store.py
    ("store", "postgresql"): INTEGRATION,  # tests/test_flow_gate.py
    ("engine", "dramatiq"): ACCEPTANCE,
    ("engine", "temporal"): ACCEPTANCE,
}
#: Tests that start a server or run a program by themselves, not through a fixture above (node
#: id prefix -> tier). A unit-tier test that starts a server or a jobyard command fails, naming
#: this table (refusing_servers).
EXPLICIT_TIERS = {
    "tests/test_job_log_indexes.py::": INTEGRATION,  # big_log: a PostgreSQL database of its own
    "tests/test_schedules.py::test_racing_schedulers_claim_and_dispatch_each_tick_once": (
        INTEGRATION  # a PostgreSQL database of its own
    ),
    "tests/test_consumer.py::test_the_worker_keeps_running_its_queue_after_redis_comes_back": (
        INTEGRATION  # a redis-server of its own, with AOF
    ),
    "tests/test_consumer.py::test_a_read_that_times_out_is_a_closed_connection_not_an_unexpected_error": (  # noqa: E501
        INTEGRATION  # a redis-server of its own, paused
    ),
    "tests/deploy/test_temporal_worker_health.py::": INTEGRATION,  # a Temporal dev server
    "tests/catalogue/test_retention.py::test_jobyard_db_prune_reads_the_retention": (
        ACCEPTANCE  # `jobyard db prune`
    ),
    # this module again, in a Python 3.12 virtualenv with its workers
    "tests/test_django.py::test_the_backend_on_django6_and_python312": ACCEPTANCE,
    # the wheel built and installed into two virtualenvs
    "tests/test_distribution.py::": ACCEPTANCE,
    "tests/test_flow_temporal_priority.py::": INTEGRATION,  # a dev server with priority flags
    # `jobyard worker` with a malformed REDIS_URL, to read what it says
    "tests/test_sentinel.py::test_the_cli_names_a_malformed_sentinel_url": ACCEPTANCE,
    # `jobyard dev` on a sentinel URL, with its API
    "tests/test_sentinel.py::test_jobyard_dev_and_its_api_run_jobs_on_dramatiq_through": (
        ACCEPTANCE
    ),
    # `jobyard worker --queues nope`, to read what it says
    "tests/test_queue_declaration.py::test_a_worker_told_an_unknown_queue_says_so": ACCEPTANCE,
}
#: A module's fixture that runs a program whole: (module, fixture) -> tier.
MODULE_FIXTURE_TIERS = {
    # docker/deploy/rolling-deploy.sh under bash against a fake docker (the module's shellcheck
    # tests do not take it and stay unit)
    ("tests/deploy/test_rolling_deploy.py", "deploy"): ACCEPTANCE,
}


def tier_of(item: pytest.Item) -> str:
    for prefix, tier in EXPLICIT_TIERS.items():
        if item.nodeid.startswith(prefix):
            return tier
    fixtures = set(getattr(item, "fixturenames", ()))
    module = item.nodeid.partition("::")[0]
    for (in_module, fixture), tier in MODULE_FIXTURE_TIERS.items():
        if module == in_module and fixture in fixtures:
            return tier
    callspec = getattr(item, "callspec", None)
    chosen = {
        PARAMETER_TIERS.get((name, value))
        for name, value in (callspec.params.items() if callspec is not None else ())
        if name in fixtures and isinstance(value, str)
    }
    if fixtures & PROCESS_FIXTURES or ACCEPTANCE in chosen:
        return ACCEPTANCE
    if fixtures & SERVER_FIXTURES or INTEGRATION in chosen:
        return INTEGRATION
    return UNIT


class ServerInUnitTest(AssertionError):
    """A unit-tier test started a server or a jobyard process: its tier is wrong."""

    def __init__(self, what: str, nodeid: str) -> None:
        super().__init__(
            f"{nodeid} is in the unit tier but {what}: add it to EXPLICIT_TIERS in "
            "tests/conftest.py (or take the fixture that gives you the server)"
        )


#: Programs a unit-tier test may not start.
SERVER_PROGRAMS = frozenset({"redis-server", "valkey-server", "temporal", "jobyard", "postgres"})


@contextlib.contextmanager
def refusing_servers(nodeid: str) -> Iterator[None]:
    """While a unit-tier test runs: starting a server program, a jobyard command (as a program
    or `python -m jobyard.cli`) or creating a PostgreSQL database fails with ServerInUnitTest."""
    popen_init = subprocess.Popen.__init__

    def guarded_popen(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
        argv = [args] if isinstance(args, str | os.PathLike) else list(args)
        program = os.path.basename(str(argv[0])) if argv else ""
        if program in SERVER_PROGRAMS or "jobyard.cli" in map(str, argv[:3]):
            raise ServerInUnitTest(f"started {program} ({argv[:3]})", nodeid)
        popen_init(self, args, *rest, **kwargs)

    def refused_database(*_args: Any, **_kwargs: Any) -> str:
        raise ServerInUnitTest("created a PostgreSQL database", nodeid)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "__init__", guarded_popen)
        patch.setattr(support, "create_pg_database", refused_database)
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    if item.get_closest_marker(UNIT) is None:
        return (yield)
    with refusing_servers(item.nodeid):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    if item.get_closest_marker(UNIT) is None:
        return (yield)
    with refusing_servers(item.nodeid):
        return (yield)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test marked with its tier; the long tests first, in LONG_FIRST's order, the rest
    keep theirs."""
    for item in items:
        item.add_marker(tier_of(item))

    def rank(item: pytest.Item) -> int:
        for i, prefix in enumerate(LONG_FIRST):
            if item.nodeid.startswith(prefix):
                return i
        return len(LONG_FIRST)

    items.sort(key=rank)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Show the lines tests record as `summary` properties (e.g. the install sizes of
    tests/test_distribution.py); user_properties survive pytest-xdist, captured output not."""
    for report in terminalreporter.stats.get("passed", []):
        for key, value in getattr(report, "user_properties", []):
            if key == "summary" and report.when == "call":
                terminalreporter.write_line(str(value))
