# bnlab: `make run` (the main job) and `make test` set themselves up from nothing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU torch pinned through a constraints file; on a GPU machine install your torch first, or `make CONSTRAINTS=`.
CONSTRAINTS ?= constraints.txt
STAMP := $(VENV)/.installed-stamp
PYTEST_CI_MARKERS := not slow and not gpu

.PHONY: setup run test test-all lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[dev]'
	touch $@

# The main job. For now: the quick CPU benchmark of bnlab's layers against torch.nn.
run: $(STAMP)
	$(BIN)/bnlab bench --quick

test: $(STAMP) lint
	$(BIN)/python -m pytest -q -m "$(PYTEST_CI_MARKERS)"

# Everything, slow checks included (torch.compile with inductor, thorough property tests).
test-all: $(STAMP) lint
	BNLAB_HYPOTHESIS=thorough $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: $(STAMP)
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

bench: $(STAMP)
	$(BIN)/bnlab bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis src/*.egg-info
