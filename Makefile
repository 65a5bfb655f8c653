# Set-up and common tasks. `make demo` and `make test` install everything into .venv first.
# torch is installed BEFORE the package so that pip never resolves an unpinned torch to a CUDA build on a
# CPU machine. GPU users choose their own build:  make demo TORCH="torch==2.13.0 --index-url <their index>"
# or reuse the torch already installed in the base interpreter:  make demo TORCH=system
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all lint docs bench clean

$(STAMP): pyproject.toml Makefile
	@if [ "$(TORCH)" = "system" ]; then $(PYTHON) -m venv --system-site-packages $(VENV); \
	else $(PYTHON) -m venv $(VENV) && $(BIN)/pip install -q --disable-pip-version-check "pip>=23" && \
	  $(BIN)/pip install -q --disable-pip-version-check $(TORCH); fi
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/torchdiffusion demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ""

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

# the documentation site into site/ (docs/, mkdocs.yml): warnings, broken links and missing references fail the
# build; the tutorials are executed with the test suite's quick settings (about 10 minutes on a loaded 2-core
# machine); TUTORIALS=full renders them with their longer default settings (better pictures, much longer)
TUTORIALS ?= small
docs: $(STAMP)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 TD_TUTORIAL_SIZE=$(TUTORIALS) PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m mkdocs build --strict

clean:
	rm -rf $(VENV) runs .pytest_cache site
