# Developer shortcuts; CI runs .ci/run (= scripts/setup --test && scripts/test).
VENV := .venv/bin

.PHONY: fmt lint typecheck test test-unit test-kernel test-root check bench

fmt:
	$(VENV)/ruff format .
	$(VENV)/ruff check --fix .

lint:
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .

typecheck:
	$(VENV)/mypy

test-unit:
	$(VENV)/pytest -m "not kernel and not root" tests

test-kernel:
	RUNTIMED_TESTS_MUST_WORK=1 $(VENV)/pytest -m kernel tests

test-root:
	RUNTIMED_TESTS_MUST_WORK=1 $(VENV)/pytest -m root tests

test:
	scripts/test

check: lint typecheck test

bench:
	$(VENV)/python bench/bench_exec.py
	$(VENV)/python bench/bench_import.py
	$(VENV)/python bench/bench_daemon.py
