# The README names these targets; each installs what it needs first.
.PHONY: setup run test test-fast checks lint typecheck protos bench clean

setup:
	bash scripts/setup.sh

run: setup
	.venv/bin/rrp run

# Everything, as CI runs it: the whole suite (slow tests included), then the static checks.
test: setup
	.venv/bin/python -m pytest -q
	$(MAKE) --no-print-directory checks

# The inner loop: tests marked slow are left out.
test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow"
	$(MAKE) --no-print-directory checks

checks:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	.venv/bin/lint-imports

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/lint-imports
	.venv/bin/buf lint

typecheck: setup
	.venv/bin/mypy

protos: setup
	.venv/bin/python -m plumbing.protogen

bench: setup
	for b in benchmarks/bench_*.py; do .venv/bin/python $$b || exit 1; done

clean:
	rm -rf out .pytest_cache .mypy_cache .ruff_cache
