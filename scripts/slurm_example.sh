#!/bin/bash
# Real-data runs on a SLURM cluster whose GPU nodes have no internet. Adapt the paths, partition and
# modules to your cluster; nothing here is run by the tests.
#
# 1. On a login node (with internet), once: fetch the datasets into a shared folder and the model
#    into the hub cache.
#      export MOE_LORA_DATA=/shared/$USER/moe_lora_data
#      python scripts/prepare_data.py --data cbqa_instruct_hub --root "$MOE_LORA_DATA"
#      HF_HUB_OFFLINE=0 huggingface-cli download meta-llama/Llama-2-7b-hf   # or a local copy
#
# 2. One job per run, offline (moe-lora sets HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 itself; a
#    missing dataset or model stops at once with a one-line error naming the key):
#      sbatch scripts/slurm_example.sh
#
# 3. Or a whole sweep through Hydra's submitit launcher (conf/hydra/launcher/slurm.yaml), submitted
#    from the login node; each job of the sweep gets one GPU:
#      SLURM_PARTITION=gpu moe-lora train -m hydra/launcher=slurm experiment=loramoe_forgetting_paper \
#          data.root="$MOE_LORA_DATA" model.name_or_path=/shared/models/Llama-2-7b-hf
#    (try the same sweep locally first with hydra/launcher=submitit_local).
#
#SBATCH --job-name=moe_lora
#SBATCH --partition=gpu
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%j.out

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
source .venv/bin/activate

DATA_ROOT=${MOE_LORA_DATA:-/shared/$USER/moe_lora_data}
MODEL=${MODEL:-/shared/models/Llama-2-7b-hf}

# One preset job (the preset's own sweep needs -m); pick the arm and seed explicitly.
moe-lora train experiment=loramoe_forgetting_paper +arm=loramoe seed=0 \
    data.root="$DATA_ROOT" model.name_or_path="$MODEL" data.num_proc="${SLURM_CPUS_PER_TASK:-8}"
