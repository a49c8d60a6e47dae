"""`jobyard keys new` and `jobyard keys rotate`: the encryption keys of
JOBYARD_ENCRYPTION_KEYS (jobyard.job_engine.crypto)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from jobyard.job_engine import env

if TYPE_CHECKING:
    from jobyard.queue.rotation import RedisPass, RedisRotation

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
#: Rotated, but values of jobs still in flight in Redis need an older key: keep it, run again.
EXIT_OLD_KEY_IN_USE = 3


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("keys", help=f"encryption keys ({env.ENCRYPTION_KEYS})")
    keys = p.add_subparsers(dest="keys_command", required=True)
    new = keys.add_parser("new", help="print a fresh key: <id>:<base64 of 32 random bytes>")
    new.add_argument("key_id", help="its id, e.g. k2 (1-32 of A-Z a-z 0-9 _ . -)")
    new.set_defaults(func=cmd_keys_new)
    rotate = keys.add_parser(
        "rotate",
        help="re-encrypt Redis's waiting jobs and the job log with the first key, in batches; "
        "one JSON line per batch; exit status 3 while values of jobs in flight still need an "
        "older key",
    )
    rotate.add_argument("--url", default=None, help=f"default: ${env.DATABASE_URL}")
    rotate.add_argument(
        "--no-redis", action="store_true",
        help=f"the database only (default: Redis too when ${env.USE_DRAMATIQ})",
    )  # fmt: skip
    rotate.add_argument(
        "--outbox-wait", type=float, default=60.0, metavar="SECONDS",
        help="how long to wait for the workers to ship job log changes sealed with an older key "
        "before the database is rotated (default 60)",
    )  # fmt: skip
    rotate.add_argument(
        "--batch", type=int, default=None, metavar="ROWS", help=f"default: ${env.ROTATE_BATCH}"
    )
    rotate.add_argument(
        "--after", action="append", default=[], metavar='TABLE=["KEY", ...]',
        help="resume a table after the key a batch line printed (repeatable)",
    )  # fmt: skip
    rotate.set_defaults(func=cmd_keys_rotate)


def cmd_keys_new(args: argparse.Namespace) -> int:
    from jobyard.job_engine import crypto

    if not crypto.KEY_ID.fullmatch(args.key_id):
        print(
            f"jobyard: {args.key_id!r} is not a key id (1-32 of A-Z a-z 0-9 _ . -)", file=sys.stderr
        )
        return EXIT_BAD_INPUT
    print(f"{args.key_id}:{crypto.new_key()}")
    return 0


def _after(given: list[str]) -> dict[str, tuple[Any, ...]]:
    out = {}
    for item in given:
        table, sep, key = item.partition("=")
        try:
            parsed = json.loads(key) if sep else None
        except ValueError:
            parsed = None
        if not isinstance(parsed, list):
            raise argparse.ArgumentTypeError(f"--after {item!r}: TABLE=[key, ...] as printed")
        out[table] = tuple(parsed)
    return out


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from jobyard.job_engine import crypto
    from jobyard.job_engine.db.rotation import BatchDone, NoEncryptionKeysError, rotate

    try:
        after = _after(args.after)
    except argparse.ArgumentTypeError as exc:
        print(f"jobyard: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if crypto.key_ring() is None:
        print(f"jobyard: {NoEncryptionKeysError.message()}", file=sys.stderr)
        return EXIT_BAD_INPUT

    def report(done: BatchDone) -> None:
        line = {"table": done.table, "read": done.read, "rewritten": done.rewritten}
        print(json.dumps({**line, "after": list(done.last)}, default=str), flush=True)

    import redis

    from jobyard.job_engine.crypto import DecryptionError, MissingEncryptionKeyError

    # Redis first: what a job still waiting there writes to the job log as it moves on (its
    # outbox entries) is then on the new key, or shipped before the database's rotation.
    redis_side = None if args.no_redis or not env.get_bool(env.USE_DRAMATIQ) else _redis_side()
    rewritten_in_redis = 0
    try:
        if redis_side is not None:
            rewritten_in_redis = redis_side.rotate(on_pass=_print_pass)
            _wait_for_outbox(redis_side, args.outbox_wait)
        batch = args.batch or env.get_int(env.ROTATE_BATCH)
        totals = rotate(args.url, batch=batch, after=after, on_batch=report)
        if redis_side is None:
            print(json.dumps({"rotated": totals}))
            return 0
        left = redis_side.old_key_holders()
    except (MissingEncryptionKeyError, DecryptionError) as exc:  # a row of the job log
        print(f"jobyard: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except redis.RedisError as exc:
        print(
            f"jobyard: Redis ({env.REDIS_URL}) did not answer: {exc}; run again, or with "
            "--no-redis to rotate the database only",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(json.dumps({
        "rotated": {**totals, "redis": rewritten_in_redis},
        "left_on_old_keys": {"redis": left.records, "job_log_outbox": left.outbox,
                             "handoff": left.handoff},
    }))  # fmt: skip
    if left.total:
        print(
            f"jobyard: {left.total} values of jobs in flight in Redis still need key(s) "
            f"{', '.join(sorted(left.key_ids))}: keep them in {env.ENCRYPTION_KEYS} and run "
            "`jobyard keys rotate` again",
            file=sys.stderr,
        )
        return EXIT_OLD_KEY_IN_USE
    return 0


def _redis_side() -> RedisRotation:
    from jobyard.queue.client import make_client
    from jobyard.queue.rotation import RedisRotation

    return RedisRotation(make_client())


def _print_pass(done: RedisPass) -> None:
    line = {"redis_pass": done.number, "hashes": done.hashes, "rewritten": done.rewritten}
    print(json.dumps({**line, "changed_meanwhile": done.changed_meanwhile,
                      "unreadable": done.unreadable}), flush=True)  # fmt: skip


def _wait_for_outbox(redis_side: RedisRotation, seconds: float) -> None:
    """Until the job log's outbox holds no change sealed with an older key (the shipper writes
    them to the database, whose rotation comes next), or `seconds` passed."""
    deadline = time.monotonic() + seconds
    while (waiting := redis_side.outbox_on_old_keys()) and time.monotonic() < deadline:
        print(json.dumps({"waiting_for_job_log_outbox": waiting}), flush=True)
        time.sleep(1.0)
