"""The `jobyard` command. Bad input exits 2 with a one-line reason; unavailable engines exit 3.

Errors are one line on stderr, never a traceback (LOG_LEVEL=DEBUG logs the traceback too). Job
modules come from JOBYARD_JOB_MODULES and from the command line (`jobyard worker myapp.jobs`),
found from the current directory the way `python -m` and Celery/Dramatiq find them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from jobyard.job_engine import JobyardError, env
from jobyard.job_engine.states import JobState

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3
DEAD_LIST_FIELDS = ("job_id", "name", "queue", "engine", "attempts", "error_message", "finished_at")


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"jobyard: {_one_line(message)}", file=sys.stderr)
    return code


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _json(text: str, what: str) -> object:
    try:
        return json.loads(text)
    except RecursionError:
        raise BadInput(f"{what} is nested too deeply") from None
    except ValueError as exc:
        raise BadInput(f"{what} is not JSON: {exc}") from None


class BadInput(Exception):
    """A command-line value jobyard refuses; main() prints it in one line and exits 2."""


def add_job_modules(modules: Sequence[str]) -> None:
    """Append modules named on the command line to JOBYARD_JOB_MODULES, so that this process
    and every process it starts (worker processes, `jobyard dev`'s children) load them."""
    current = [m.strip() for m in os.environ.get(env.JOB_MODULES, "").split(",") if m.strip()]
    for module in modules:
        for name in module.split(","):
            if name.strip() and name.strip() not in current:
                current.append(name.strip())
    if current:
        os.environ[env.JOB_MODULES] = ",".join(current)


def check_job_modules(import_them: bool = True) -> None:
    """Make sure the job modules import, so that one that cannot is one line here rather than a
    traceback (for dispatch, in the middle of a request). With `import_them` False (`jobyard
    worker`, whose worker processes import them) only find them: the supervisor stays light."""
    import importlib
    import importlib.util

    for module in os.environ.get(env.JOB_MODULES, "").split(","):
        if not (module := module.strip()):
            continue
        try:
            if import_them:
                importlib.import_module(module)
            elif importlib.util.find_spec(module) is None:
                raise ModuleNotFoundError(f"No module named {module!r}", name=module)
        except ModuleNotFoundError as exc:
            if exc.name and module.startswith(exc.name):
                raise BadInput(
                    f"job module {module!r} not found (looked in {os.getcwd()} and sys.path; "
                    f"set {env.JOB_MODULES} or run from your project's directory)"
                ) from None
            raise BadInput(f"job module {module!r} failed to import: {exc}") from None
        except Exception as exc:
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            raise BadInput(
                f"job module {module!r} failed to import: {type(exc).__name__}: {exc} "
                f"({frame.filename}:{frame.lineno})"
            ) from None


def cmd_dispatch(args: argparse.Namespace) -> int:
    from jobyard.dispatcher import DispatchUnavailableError, dispatch_job

    payload = _json(args.payload, "--payload")
    try:
        handle = dispatch_job(
            args.name, payload, job_id=args.job_id, delay=args.delay, priority=args.priority
        )
    except DispatchUnavailableError as exc:
        return _fail(str(exc), EXIT_UNAVAILABLE)
    except (JobyardError, ValueError) as exc:
        return _fail(str(exc))
    print(json.dumps({"job_id": handle.job_id, "engine": handle.engine}))
    return 0


def _print_status(lookup: Callable[[str], object], job_id: str) -> int:
    from jobyard.dispatcher import EngineUnavailable, JobNotFoundError

    try:
        status = lookup(job_id)
    except JobNotFoundError as exc:
        return _fail(str(exc), 1)
    except EngineUnavailable as exc:
        return _fail(str(exc), EXIT_UNAVAILABLE)
    print(json.dumps(status.as_dict(), default=str))  # type: ignore[attr-defined]
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from jobyard.dispatcher import get_job

    return _print_status(get_job, args.job_id)


def cmd_worker(args: argparse.Namespace) -> int:
    from jobyard.job_engine.queues import parse_queue_list
    from jobyard.worker.supervisor import run_workers

    try:
        queues = parse_queue_list(args.queues)
    except ValueError as exc:
        return _fail(str(exc))
    processes = args.processes or env.get_int(env.WORKER_PROCESSES)
    if processes < 1:
        return _fail("--processes must be at least 1")
    return run_workers(queues, processes)


def cmd_temporal_worker(args: argparse.Namespace) -> int:
    from jobyard.job_engine.queues import parse_queue_list
    from jobyard.temporal_worker.supervisor import supervise

    try:
        queues = parse_queue_list(args.queues)
    except ValueError as exc:
        return _fail(str(exc))
    return supervise(queues)


def cmd_health(args: argparse.Namespace) -> int:
    from jobyard.worker.health import check_health

    ok, message = check_health(args.queues)
    print(message)
    return 0 if ok else 1


def cmd_dev(args: argparse.Namespace) -> int:
    from jobyard.cli.dev import run_dev

    return run_dev(not args.no_canary, args.api_port)


def cmd_run(args: argparse.Namespace) -> int:
    from jobyard.job_engine.inline import run_inline

    try:
        result = run_inline(args.name, _json(args.payload, "--payload"))
    except ValueError as exc:
        return _fail(str(exc))
    print(json.dumps(result, default=str))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from jobyard.dispatcher import cancel_job

    return _print_status(cancel_job, args.job_id)


def cmd_dead(args: argparse.Namespace) -> int:
    from jobyard.dispatcher import (
        EngineUnavailable,
        JobNotFoundError,
        JobStillActiveError,
        get_job_record,
        list_jobs,
        replay_job,
    )

    if args.dead_command == "list":
        for record in list_jobs(state=JobState.DEAD, name=args.name, limit=args.limit):
            print(json.dumps({k: record.as_dict()[k] for k in DEAD_LIST_FIELDS}, default=str))
        return 0
    if args.dead_command == "show":
        found = get_job_record(args.job_id)
        if found is None:
            return _fail(f"no job {args.job_id!r} in the job log", 1)
        print(json.dumps(found.as_dict(), indent=2, default=str))
        return 0
    try:
        handle = replay_job(args.job_id)
    except JobNotFoundError as exc:
        return _fail(str(exc), 1)
    except JobStillActiveError as exc:
        return _fail(str(exc))
    except EngineUnavailable as exc:
        return _fail(str(exc), EXIT_UNAVAILABLE)
    print(json.dumps({"job_id": handle.job_id, "engine": handle.engine}))
    return 0


def api_missing() -> str | None:
    """Why the HTTP API cannot run here (its extra is not installed), or None."""
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        return f"the HTTP API needs {', '.join(missing)}: pip install 'jobyard[api]'"
    return None


def cmd_api(args: argparse.Namespace) -> int:
    if reason := api_missing():
        return _fail(reason)
    from jobyard.api.server import serve

    serve(args.host, args.port)
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    try:
        from jobyard.job_engine.db.migrate import upgrade
    except ImportError as exc:
        return _fail(f"database support is not installed: {exc}")
    upgrade(args.url)
    print("database is at the latest revision")
    return 0


def cmd_db_prune(args: argparse.Namespace) -> int:
    try:
        from jobyard.job_engine.db.retention import prune_job_log
    except ImportError as exc:
        return _fail(f"database support is not installed: {exc}")
    try:
        pruned = prune_job_log(args.older_than_days, url=args.url)
    except ValueError as exc:  # a negative retention, from the option or the environment
        return _fail(str(exc))
    print(json.dumps({"pruned": pruned}))
    return 0


MODULES_HELP = f"modules declaring your jobs (added to ${env.JOB_MODULES})"


def modules_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("modules", nargs="*", metavar="MODULE", help=MODULES_HELP)


def modules_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--modules", action="append", default=[], metavar="MODULE[,MODULE]", help=MODULES_HELP
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobyard", description="Background jobs for Python web apps"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("dispatch", help="dispatch a job; prints {job_id, engine}")
    p.add_argument("name")
    p.add_argument("--payload", default="{}", help="the payload as JSON")
    p.add_argument("--job-id", help="idempotency key: dispatching it twice starts one job")
    p.add_argument("--delay", type=float, help="seconds before the job may start")
    p.add_argument(
        "--priority",
        type=int,
        help="-100 to 100, higher starts first among its queue's waiting jobs (default: the "
        "job's own)",
    )
    modules_option(p)
    p.set_defaults(func=cmd_dispatch, loads_jobs=True)

    p = sub.add_parser("status", help="print a job's status as JSON")
    p.add_argument("job_id")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cancel", help="cancel a job; prints its status as JSON")
    p.add_argument("job_id")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("dead", help="dead letters: jobs that exhausted their retries")
    dead = p.add_subparsers(dest="dead_command", required=True)
    d = dead.add_parser("list", help="one JSON line per dead job, newest first")
    d.add_argument("--name", help="only this job")
    d.add_argument("--limit", type=int, default=50)
    d = dead.add_parser("show", help="a dead job's payload, error and traceback")
    d.add_argument("job_id")
    d = dead.add_parser("replay", help="run a dead job again (never while it runs)")
    d.add_argument("job_id")
    modules_option(d)
    d.set_defaults(loads_jobs=True)
    p.set_defaults(func=cmd_dead)

    p = sub.add_parser("api", help="serve the HTTP API and the dashboard")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    modules_option(p)
    p.set_defaults(func=cmd_api, loads_jobs=True)

    p = sub.add_parser("worker", help="run Dramatiq worker processes")
    modules_argument(p)
    p.add_argument("--queues", default="", help="comma-separated queues (default: all)")
    p.add_argument(
        "--processes", type=int, default=0, help=f"default: ${env.WORKER_PROCESSES} or 2"
    )
    p.set_defaults(func=cmd_worker, loads_jobs="find")

    p = sub.add_parser("temporal-worker", help="run the Temporal worker")
    modules_argument(p)
    p.add_argument(
        "--queues", default="", help="comma-separated queues whose steps it runs (default: all)"
    )
    p.set_defaults(func=cmd_temporal_worker, loads_jobs=True)

    p = sub.add_parser("health", help="exit 0 when this host's worker is alive")
    p.add_argument("--queues", default="", help="queues that must have a live worker here")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("dev", help="run everything on this machine with embedded defaults")
    modules_argument(p)
    p.add_argument("--no-canary", action="store_true", help="skip the start-up system.echo check")
    p.add_argument("--api-port", type=int, default=8000, help="HTTP API and dashboard; 0 = off")
    p.set_defaults(func=cmd_dev, loads_jobs=True)

    p = sub.add_parser("run", help="run a job in this process (debugging)")
    p.add_argument("name")
    p.add_argument("--payload", default="{}")
    modules_option(p)
    p.set_defaults(func=cmd_run, loads_jobs=True)

    p = sub.add_parser("db", help="database schema")
    db = p.add_subparsers(dest="db_command", required=True)
    up = db.add_parser("upgrade", help="apply migrations")
    up.add_argument("--url", default=None, help=f"default: ${env.DATABASE_URL} or the SQLite file")
    up.set_defaults(func=cmd_db_upgrade)
    pr = db.add_parser(
        "prune", help="delete finished jobs past the job log's retention; prints {pruned}"
    )
    pr.add_argument(
        "--older-than-days", type=float, default=None, metavar="DAYS",
        help=f"default: ${env.JOB_LOG_RETENTION_DAYS} or 30",
    )  # fmt: skip
    pr.add_argument("--url", default=None, help=f"default: ${env.DATABASE_URL} or the SQLite file")
    pr.set_defaults(func=cmd_db_prune)

    from jobyard.cli.keys import add_parsers as add_keys_parsers
    from jobyard.cli.schedules import add_parsers as add_schedule_parsers

    add_schedule_parsers(sub)
    add_keys_parsers(sub)
    return parser


def describe_error(exc: BaseException) -> tuple[str, int]:
    """One line for an error a command did not handle itself, and the exit code."""
    import redis
    from sqlalchemy.exc import DBAPIError

    from jobyard.queue.redis_url import RedisUrlError, shown_redis_url

    if isinstance(exc, DBAPIError):
        from jobyard.job_engine.db import database_url

        url = database_url()
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        if "no such table" in reason or "does not exist" in reason:
            return (
                f"the database at {url} is not migrated ({reason}): run `jobyard db upgrade`",
                EXIT_UNAVAILABLE,
            )
        return f"the database at {url} is unavailable: {reason}", EXIT_UNAVAILABLE
    if isinstance(exc, RedisUrlError):
        return f"{env.REDIS_URL} is malformed: {exc}", EXIT_BAD_INPUT
    if isinstance(exc, redis.RedisError):
        return (
            f"Redis at {shown_redis_url(env.get_str(env.REDIS_URL))} is unavailable: {exc}",
            EXIT_UNAVAILABLE,
        )
    if type(exc).__module__.startswith("temporalio") or "client connect" in str(exc):
        address = env.get(env.TEMPORAL_ADDRESS)
        return f"Temporal at {address} is unavailable: {exc}", EXIT_UNAVAILABLE
    if isinstance(exc, RecursionError):
        return "the input is nested too deeply", EXIT_BAD_INPUT
    return f"{type(exc).__name__}: {exc} (LOG_LEVEL=DEBUG shows where)", EXIT_FAILED


def run_command(args: argparse.Namespace) -> int:
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        add_job_modules(getattr(args, "modules", None) or [])
        if loads_jobs := getattr(args, "loads_jobs", False):
            check_job_modules(import_them=loads_jobs != "find")
        return func(args)
    except BadInput as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        logging.getLogger("jobyard.cli").debug("jobyard %s failed", args.command, exc_info=True)
        message, code = describe_error(exc)
        return _fail(message, code)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "WARNING"))
    # A console script's sys.path starts with its bin directory, not the current one (as
    # `python -m` has): put the current directory first, so `myapp.jobs` is found from the
    # project's directory, as Celery and Dramatiq find it.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    args = build_parser().parse_args(argv)
    sys.exit(run_command(args))
