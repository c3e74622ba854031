# Two commands a fresh machine needs:  `make run`  and  `make test`.
# The first creates .venv (CPU torch first, then rlpost) if it is missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.rlpost-installed
export HF_HUB_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: run test test-slow

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)        ## the main job: SFT then GRPO on the embedded default
	$(VENV)/bin/rlpost train

test: $(STAMP)       ## the fast default suite (what CI runs)
	$(PY) -m pytest -q

test-slow: $(STAMP)  ## opt-in end-to-end runs (minutes)
	$(PY) -m pytest -q -m slow
