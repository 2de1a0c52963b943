#!/usr/bin/env bash
# Layouts compared at one budget (5 experts per layer on average, MoLA r=8 top-2 on the built-in
# world): a uniform probe run, the three telemetry heuristics written from it and AlphaLoRA's
# training-free alpha rule (layout-from-probe), a TPE search over the depth profile
# (experiment=layout_search, few steps, one seed), then the search winner, the heuristics, the five
# named shapes and uniform at full steps x 3 seeds with claims (search-confirm --preset
# layout_heuristics: experiment=layout_heuristics), and the report. Generated layouts and the preset
# go to conf/local/ (git-ignored). Usage: scripts/compare_layouts.sh [TRIALS]   (`make layouts`)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
TRIALS=${1:-12}
root=multirun/layouts
local_conf="$PWD/conf/local"
search="hydra.searchpath=[file://$local_conf]"
mkdir -p "$root"
"$BIN/moe-lora" train adapter=mola adapter.num_experts=5 recipe.max_steps=150 seed=0 "hydra.run.dir=$root/probe" \
  resume=auto
for rule in usage mi entropy alpha; do
  "$BIN/moe-lora" layout-from-probe "$root/probe" --rule "$rule" --name "probe_$rule" \
    --out "$local_conf/layout/probe_$rule.yaml" --overwrite
done
"$BIN/moe-lora" train -m experiment=layout_search "hydra.sweep.dir=$root/search" "hydra.sweeper.n_trials=$TRIALS"
"$BIN/moe-lora" search-confirm "$root/search" --top 1 --study layouts --conf-dir "$local_conf" \
  --with probe_usage,probe_mi,probe_entropy,probe_alpha --preset layout_heuristics --overwrite
"$BIN/moe-lora" train -m experiment=layout_heuristics "$search"
"$BIN/moe-lora" report "$(ls -td multirun/layout_heuristics/*/ | head -n 1)"
