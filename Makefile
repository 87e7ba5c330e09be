# Two commands set everything up on a fresh machine:
#   make run    install, then sweep the offline default lineup (CPU is fine)
#   make test   install (with the test extras and Chromium), then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines take the local CPU build of torch; with a GPU, install your CUDA torch first
# (e.g. TORCH_SPEC="torch") or point VENV at an environment that has it.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install run test browser ui clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The offline lineup's quick settings: about a minute on a 2-core machine. Real sweeps run
# `python -m sweep --config ...` with tasks.yaml as it is.
RUN_FLAGS ?= --max-prompts 16 --max-new-tokens 128 --cpu-workers 2

run: install
	$(PY) -m sweep --config models.yaml $(RUN_FLAGS)

# Debian's Chromium for the UI's browser test (skipped when it cannot be installed).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
	  || echo "chromium could not be installed: the browser test will be skipped"

test: install browser
	$(PY) -m pytest -q -rs

ui: install
	$(PY) -m ui --runs runs

clean:
	rm -rf $(VENV)
