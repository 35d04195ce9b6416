# RealisID. `make setup`, `make train`, `make test` are the three commands the README starts with.
PY      ?= .venv/bin/python
EXP     ?= local_branch
ARGS    ?=
RESUME  ?=
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1

.PHONY: setup train prepare test test-fast clean-cache

setup:
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'

train:
	$(PY) -m realisid train $(EXP) $(ARGS) $(if $(RESUME),--resume $(RESUME))

prepare:
	$(PY) -m realisid prepare $(EXP) $(ARGS)

test:
	$(PY) -m pytest

test-fast:
	$(PY) -m pytest -m "not slow"

clean-cache:
	rm -rf data/cache data/synthetic
