# bnlab: `make run` (the main job) and `make test` set themselves up from nothing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU torch pinned through a constraints file; on a GPU machine install your torch first, or `make CONSTRAINTS=`.
CONSTRAINTS ?= constraints.txt
STAMP := $(VENV)/.installed-stamp
PYTEST_CI_MARKERS := not slow and not gpu
# pytest-xdist: one test process per core (`auto`), idle processes take queued tests from busy ones.
PYTEST_WORKERS ?= auto
PYTEST_PARALLEL := -n $(PYTEST_WORKERS) --dist worksteal

.PHONY: setup data run test test-all lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[dev]'
	touch $@

# Fashion-MNIST from Debian's package where apt and root are at hand; elsewhere bnlab downloads it
# (official mirror, sha256-checked) into ~/.cache/bnlab on first use.
DEBIAN_DATA := /usr/share/datasets/fashion-mnist
data:
	@if [ -d $(DEBIAN_DATA) ]; then echo "data: $(DEBIAN_DATA)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) \
		|| echo "data: apt could not install dataset-fashion-mnist; bnlab will download the files"; \
	else echo "data: no apt (or not root); bnlab will download Fashion-MNIST on first use"; fi

# The main job: every experiment at the quick profile (2 CPU cores), then the report in runs/report.html.
run: $(STAMP) data
	$(BIN)/bnlab reproduce --profile quick

test: $(STAMP) lint
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL) -m "$(PYTEST_CI_MARKERS)"

# Everything, slow checks included (torch.compile with inductor, thorough property tests).
test-all: $(STAMP) lint
	BNLAB_HYPOTHESIS=thorough $(BIN)/python -m pytest -q $(PYTEST_PARALLEL)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

bench: $(STAMP)
	$(BIN)/bnlab bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis src/*.egg-info
