# Two entry points for a fresh machine: `make dev` runs the system, `make test` runs the tests.
# Both install what they need first (uv, then the locked workspace into .venv).
UV := python3 -m uv

.PHONY: setup dev test lint format bench chaos

setup:
	@python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen

dev: setup
	$(UV) run jobyard dev

test: setup
	$(UV) run pytest -n 2

lint: setup
	$(UV) run ruff check .
	$(UV) run ruff format --check .

format: setup
	$(UV) run ruff check --fix .
	$(UV) run ruff format .

bench: setup
	$(UV) run python bench/run_all.py

# The fault suite at full size (issue 11): hundreds of jobs per fault, every step execution counted.
# Prints the fault table; exits non-zero when any row misses a target. Under 15 minutes.
chaos: setup
	$(UV) run python -m tests.faults.run
