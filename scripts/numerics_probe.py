"""Which CPU knobs change the world model's weights, and what pinning them costs.

Each setting runs a short pretraining of the default world model (``model.pretrain.steps``
overridden, 1 thread unless the setting says otherwise) in a fresh process with that setting's
environment, and prints the weights' hash, how many weights differ from the first setting, the
largest difference and the CPU seconds per step:

    python scripts/numerics_probe.py --steps 10
    python scripts/numerics_probe.py --steps 10 --write   # also into docs/reproducibility.md

A setting emulates another CPU on this one: ``ATEN_CPU_CAPABILITY=default`` runs ATen's scalar
kernels (a CPU without AVX2), ``MKL_CBWR=COMPATIBLE`` MKL's SSE2 GEMM branch, a thread count
another machine's core count. Settings that a CPU cannot honour (AVX-512 on a CPU without it, an
MKL branch on a CPU MKL does not dispatch by branch) give the first setting's weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "reproducibility.md"
BEGIN, END = "<!-- probe:begin (scripts/numerics_probe.py --write writes this table) -->", "<!-- probe:end -->"
SETTINGS = [
    "OMP_NUM_THREADS=1",
    "OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=default",
    "OMP_NUM_THREADS=1 MKL_ENABLE_INSTRUCTIONS=SSE4_2",
    "OMP_NUM_THREADS=1 MKL_CBWR=AVX2",
    "OMP_NUM_THREADS=1 MKL_CBWR=COMPATIBLE",
    "OMP_NUM_THREADS=1 ONEDNN_MAX_CPU_ISA=SSE41",
    "OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE",
    "OMP_NUM_THREADS=2",
    "OMP_NUM_THREADS=3",
]
CHILD = """
import hashlib, json, sys, time, torch
from transformers import LlamaForCausalLM
from moe_lora.recipes.compose import load_config
from moe_lora.world.generator import World
from moe_lora.world.model import world_model_config
from moe_lora.world.pretrain import pretrain
from moe_lora.world.tokenizer import word_tokenizer
torch.set_num_threads(int(sys.argv[2]))
cfg = load_config([f"model.pretrain.steps={sys.argv[1]}"], check_files=False)
world = World(cfg.data.world)
torch.manual_seed(world.cfg.seed)
model = LlamaForCausalLM(world_model_config(cfg.model, len(world.vocab)))
start = time.process_time()
pretrain(model, word_tokenizer(world.vocab), world.pretraining_corpus(), cfg.model.pretrain, world.cfg.seed, False)
cpu = time.process_time() - start
sd = model.state_dict()
torch.save(sd, sys.argv[3])
digest = hashlib.sha256(b"".join(v.numpy().tobytes() for _, v in sorted(sd.items()))).hexdigest()[:12]
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "hash": digest, "cpu_s": cpu}))
"""


def probe(setting: str, steps: int, out: Path) -> dict:
    env = dict(kv.split("=", 1) for kv in setting.split())
    threads = env.get("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-c", CHILD, str(steps), threads, str(out)]
    done = subprocess.run(cmd, env={**os.environ, **env}, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[tuple[str, dict, int, float]], steps: int, first_cpu: float, total: int) -> str:
    lines = [
        f"| setting ({steps} pretraining steps) | ATen kernels | weights hash | weights differing | max abs diff | CPU s/step |",
        "|---|---|---|---|---|---|",
    ]
    for setting, r, ndiff, dmax in rows:
        cost = r["cpu_s"] / steps
        lines.append(
            f"| `{setting}` | {r['capability']} | `{r['hash']}` | {ndiff:,} of {total:,} | {dmax:.1e} | "
            f"{cost:.3f} ({cost / (first_cpu / steps):.2f}x) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Which CPU knobs change the world model's weights, at what cost.")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--write", action="store_true", help="write the table into docs/reproducibility.md")
    p.add_argument("settings", nargs="*", default=SETTINGS, help="space-separated VAR=value settings")
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        first = None
        for i, setting in enumerate(a.settings):
            r = probe(setting, a.steps, Path(tmp) / f"{i}.pt")
            sd = torch.load(Path(tmp) / f"{i}.pt")
            first = first or sd
            ndiff = sum(int((sd[k] != first[k]).sum()) for k in sd)
            dmax = max(float((sd[k] - first[k]).abs().max()) for k in sd)
            rows.append((setting, r, ndiff, dmax))
            print(setting, r, ndiff, dmax, flush=True)
        total = sum(v.numel() for v in first.values())
    text = table(rows, a.steps, rows[0][1]["cpu_s"], total)
    print(text)
    if a.write:
        head, rest = PAGE.read_text().split(BEGIN)
        PAGE.write_text(f"{head}{BEGIN}\n{text}\n{END}{rest.split(END)[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
