# The README names these targets; each installs what it needs first.
.PHONY: setup run test lint typecheck protos bench clean

setup:
	bash scripts/setup.sh

run: setup
	.venv/bin/rrp run

test: setup
	.venv/bin/python -m pytest -q
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/buf lint

typecheck: setup
	.venv/bin/mypy

protos: setup
	.venv/bin/python -m plumbing.protogen
	.venv/bin/python -m serving.protogen

bench: setup
	for b in benchmarks/bench_*.py; do .venv/bin/python $$b || exit 1; done

clean:
	rm -rf out .pytest_cache .mypy_cache .ruff_cache
