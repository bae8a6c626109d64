# The two commands of the README: `make demo` and `make test`. Each makes its
# own virtual environment (.venv) on first use, with only Python >= 3.11.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit schemas bench bench-agentq bench-retention clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "agentq needs Python >= 3.11; set PYTHON=python3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/agentq demo

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

# Two pytest workers (pytest-xdist): most tests wait on Redis, processes and
# servers, so two share this machine's two cores well (about 5 minutes, not 10).
unit: $(STAMP)
	$(BIN)/pytest -q -n 2

test: lint typecheck unit

schemas: $(STAMP)
	$(BIN)/python -m agentq.schemas.export

# Every figure of the README's benchmark section, each on a throwaway Redis:
# agentq against the Python job queues (installs each peer into benchmarks/.peers/),
# then agentq's own figures, then the README section from the newest results.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench_peers
	$(MAKE) bench-agentq
	$(BIN)/python -m benchmarks.readme_table

# agentq's own figures: dispatch, drain, dependency release, views, memory,
# scale (1 to 1,000 agents, one server and a local 3-master cluster), and
# retention (memory after the window, archiving, reads from the archive).
bench-agentq: $(STAMP)
	$(BIN)/python -m benchmarks.bench_dispatch
	$(BIN)/python -m benchmarks.bench_drain
	$(BIN)/python -m benchmarks.bench_release
	$(BIN)/python -m benchmarks.bench_views
	$(BIN)/python -m benchmarks.bench_memory
	$(BIN)/python -m benchmarks.bench_scale
	$(MAKE) bench-retention

# Issue 14's targets: Redis memory after the retention window, bytes per job inside
# it, archiving and archive reads, audit verify and rebuild at 1,000,000 jobs.
bench-retention: $(STAMP)
	$(BIN)/python -m benchmarks.bench_retention

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
