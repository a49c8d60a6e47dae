"""`jobyard schedules ...` and `jobyard scheduler`: see and steer the declared schedules."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from datetime import datetime
from typing import Any

from jobyard.job_engine import JobyardError, ScheduleError

EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3
LIST_COLUMNS = ("name", "job", "spec", "timezone", "state", "next_fire", "last_tick_at", "last")


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"jobyard: {message}", file=sys.stderr)
    return code


def _instant(text: str) -> datetime:
    """ISO 8601 with a zone; `Z` accepted."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone (add Z or +00:00)")
    return moment


def _table(items: list[dict[str, Any]]) -> str:
    rows = [LIST_COLUMNS]
    for item in items:
        state = "off" if not item["enabled"] else "paused" if item["paused"] else "active"
        last = item["last_job_state"] or "-"
        rows.append(
            (
                item["name"],
                item["job"],
                item["spec"],
                item["timezone"],
                state,
                item["next_fire"] or "-",
                item["last_tick_at"] or "-",
                last,
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(LIST_COLUMNS))]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def cmd_schedules(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from jobyard.dispatcher import scheduler

    try:
        if args.schedules_command == "list":
            items = scheduler.list_schedules()
            print(json.dumps(items, indent=2) if args.json else _table(items))
            return 0
        if args.schedules_command == "pause":
            result = scheduler.pause_schedule(args.name)
        elif args.schedules_command == "resume":
            result = scheduler.resume_schedule(args.name)
        elif args.schedules_command == "trigger":
            result = scheduler.trigger_schedule(args.name)
        else:
            result = scheduler.backfill_schedule(args.name, args.start, args.end)
    except (ScheduleError, JobyardError) as exc:
        return _fail(str(exc))
    except SQLAlchemyError as exc:
        return _fail(f"database unavailable: {str(exc).splitlines()[0]}", EXIT_UNAVAILABLE)
    print(json.dumps(result, default=str))
    return 0


def cmd_scheduler(_: argparse.Namespace) -> int:
    """Run only the scheduler (every worker runs one too; this is for hosts without workers)."""
    from jobyard.dispatcher.scheduler import Scheduler, run_forever

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", force=True
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    scheduler = Scheduler(role="scheduler")
    logging.getLogger("jobyard.scheduler").info("scheduler started (%s)", scheduler.owner)
    run_forever(stop, scheduler)
    return 0


def add_parsers(sub: Any) -> None:
    """Register `schedules` and `scheduler` on the `jobyard` command's subparsers."""
    p = sub.add_parser("schedules", help="list, pause, resume, trigger and backfill schedules")
    commands = p.add_subparsers(dest="schedules_command", required=True)
    c = commands.add_parser("list", help="every schedule: spec, zone, next and last fire")
    c.add_argument("--json", action="store_true", help="JSON, with every field")
    for name, help_ in (
        ("pause", "stop firing until resumed (survives restarts)"),
        ("resume", "fire again from now on"),
        ("trigger", "run the schedule's job once now"),
    ):
        c = commands.add_parser(name, help=help_)
        c.add_argument("name")
    c = commands.add_parser("backfill", help="fire the ticks of a past range that never fired")
    c.add_argument("name")
    c.add_argument("--start", type=_instant, required=True, help="ISO 8601, e.g. 2026-11-01T00:00Z")
    c.add_argument("--end", type=_instant, required=True, help="ISO 8601, inclusive")
    p.set_defaults(func=cmd_schedules)

    p = sub.add_parser("scheduler", help="run a scheduler alone (workers run one each already)")
    p.set_defaults(func=cmd_scheduler)
