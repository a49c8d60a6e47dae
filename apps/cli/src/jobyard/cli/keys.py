"""`jobyard keys new` and `jobyard keys rotate`: the encryption keys of
JOBYARD_ENCRYPTION_KEYS (jobyard.job_engine.crypto)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from jobyard.job_engine import env

EXIT_BAD_INPUT = 2


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("keys", help=f"encryption keys ({env.ENCRYPTION_KEYS})")
    keys = p.add_subparsers(dest="keys_command", required=True)
    new = keys.add_parser("new", help="print a fresh key: <id>:<base64 of 32 random bytes>")
    new.add_argument("key_id", help="its id, e.g. k2 (1-32 of A-Z a-z 0-9 _ . -)")
    new.set_defaults(func=cmd_keys_new)
    rotate = keys.add_parser(
        "rotate",
        help="re-encrypt the job log with the first key, in batches; one JSON line per batch",
    )
    rotate.add_argument("--url", default=None, help=f"default: ${env.DATABASE_URL}")
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
    from jobyard.job_engine.db.rotation import BatchDone, NoEncryptionKeysError, rotate

    try:
        after = _after(args.after)
    except argparse.ArgumentTypeError as exc:
        print(f"jobyard: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    def report(done: BatchDone) -> None:
        line = {"table": done.table, "read": done.read, "rewritten": done.rewritten}
        print(json.dumps({**line, "after": list(done.last)}, default=str), flush=True)

    batch = args.batch or env.get_int(env.ROTATE_BATCH)
    try:
        totals = rotate(args.url, batch=batch, after=after, on_batch=report)
    except NoEncryptionKeysError as exc:
        print(f"jobyard: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps({"rotated": totals}))
    return 0
