# Every target creates .venv itself, so each works on a bare machine with Python 3.11 and pip.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint docs campaign bench compat clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the CPU build on this machine; a range would pull CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,plot,docs]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/adding_problem.py

lint: $(STAMP)
	$(BIN)/ruff check lightning_clip tests examples benchmarks
	$(BIN)/ruff format --check lightning_clip tests examples benchmarks
	$(BIN)/mypy

# The docs site (mkdocs.yml, docs/) into site/; --strict turns every warning (a broken link, an API
# reference that does not resolve) into a failure.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site

test: lint docs
	$(BIN)/python -m pytest -n 2 -q

# fresh virtualenvs with only `lightning` (2.6.6, 2.5.6, and lightning.pytorch alone) or only
# `pytorch-lightning` (2.6.6, 2.5.6): README quick-start, examples/lightning_cli, tests/namespaces
compat:
	PY=$(PY) bash .ci/compat.sh

campaign: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m slow --run-slow -p no:cacheprovider tests/reliability

bench: $(STAMP)
	$(BIN)/python benchmarks/clip_step.py
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/scaling.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache site build/compat
