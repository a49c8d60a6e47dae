"""`make chaos`: every fault row at full size; prints the table, exits 1 if a target is missed.

python -m tests.faults.run                 # all rows
python -m tests.faults.run -k sigterm      # rows whose scenario name contains "sigterm"
python -m tests.faults.run --scale 0.2     # fewer jobs per row
python -m tests.faults.run -k key_rotation # issue 33's key rotation row (make chaos-rotation)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from tests.faults import flow_rate, flow_slots, rotation, temporal_crash
from tests.faults.children import ROWS as CHILDREN_ROWS
from tests.faults.failover import ROWS as FAILOVER_ROWS
from tests.faults.poison import ROWS as POISON_ROWS
from tests.faults.scenarios import FULL, Harness, Row, table
from tests.faults.transactional import ROWS as TRANSACTIONAL_ROWS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-k", default="", help="only scenarios whose name contains one of these (comma-separated)"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every job count")
    parser.add_argument(
        "--settle", type=float, default=45.0,
        help="seconds accepted jobs get to finish after the faults end",
    )  # fmt: skip
    args = parser.parse_args(argv)

    from jobyard.job_engine.db.migrate import upgrade
    from tests.faults.procs import temporal_dev_server

    workdir = Path(tempfile.mkdtemp(prefix="jobyard-chaos-"))
    database_url = f"sqlite:///{workdir / 'jobyard.db'}"
    upgrade(database_url)
    began = time.monotonic()
    temporal = temporal_dev_server()
    harness = Harness(temporal.address, database_url, workdir, settle=args.settle)
    rows: list[Row] = []
    try:
        rows_in_order = [
            *FULL,
            *POISON_ROWS,
            *temporal_crash.FULL,
            *flow_slots.ROWS,
            *flow_rate.ROWS,
            *TRANSACTIONAL_ROWS,
            *FAILOVER_ROWS,
            *CHILDREN_ROWS,
            *rotation.ROWS,
        ]
        for scenario, params in rows_in_order:
            if not any(k in scenario.__name__ for k in args.k.split(",")):
                continue
            scaled = {
                k: max(1, round(v * args.scale)) if k.startswith("n") else v
                for k, v in params.items()
            }
            print(f"== {scenario.__name__} {scaled}", flush=True)
            try:
                row = scenario(harness, **scaled)
            except Exception:
                traceback.print_exc()
                row = Row(scenario.__name__, missed=["the scenario crashed"])
            rows.append(row)
            print(table([row]).splitlines()[1], flush=True)
    finally:
        temporal.stop()
    print(f"\nfault table ({time.monotonic() - began:.0f} s, ledgers in {workdir})")
    print(table(rows))
    missed = [(r.fault, m) for r in rows for m in r.missed]
    for fault, target in missed:
        print(f"MISSED  {fault}: {target}")
    print("all targets met" if not missed else f"{len(missed)} targets missed")
    return 1 if missed else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter finalisation: the Temporal dev server's client threads can abort it
    # ("PyGILState_Release ... finalizing") and turn a clean run's exit status into a crash.
    os._exit(code)
