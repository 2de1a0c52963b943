"""Data parallel on ``torch.distributed``: the process group, rank-0-only writes, global sums.

One process per device. Three ways to get there, one code path after:

* ``torchrun --nproc-per-node N -m moe_lora train ...``: torchrun sets ``RANK``/``WORLD_SIZE``;
* ``recipe.nproc_per_node=N``: the Hydra job spawns N local workers itself (so ``-m`` sweeps and
  the submitit launcher work unchanged), see :func:`spawn`;
* SLURM through submitit with ``tasks_per_node=N``: submitit's environment names the ranks.

Every rank builds the same model from the same config and seed; rank 0 alone writes files. The
loop asks this module for its reductions (the routing recorder is handed a reduce function and
never imports ``torch.distributed``). NCCL on CUDA devices, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.nn.functional import all_reduce
from torch.nn.parallel import DistributedDataParallel

from moe_lora.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; the single-process default makes every method a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    aux_group: Any = None  # a second group for differentiable all-reduces inside backward

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (no autograd)."""
        if self.enabled:
            dist.all_reduce(t)
        return t

    def all_max(self, t: torch.Tensor) -> torch.Tensor:
        """Maximum over ranks, in place: flags and signal numbers, which a sum would change (two
        ranks that both got SIGTERM (15) must not report 30)."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def all_reduce_grad(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks that autograd differentiates (its backward sums the gradients), on a
        group of its own so that it never interleaves with DDP's gradient buckets."""
        return all_reduce(t, group=self.aux_group) if self.enabled else t

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (any picklable object)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (it fills caches: the pretrained world model, tokenised
        data), the other ranks then find them filled instead of writing them concurrently."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def shard(self, n: int) -> range:
        """The items ``rank, rank + world, ...`` of ``n`` (evaluation: every example once)."""
        return range(self.rank, n, self.world_size)

    def unshard(self, parts: list[list[Any]]) -> list[Any]:
        """Put gathered :meth:`shard` parts back in their original order."""
        out: list[Any] = [None] * sum(len(p) for p in parts)
        for r, part in enumerate(parts):
            out[r :: self.world_size] = part
        return out


def env_world_size() -> int:
    """Ranks announced by the launcher's environment (torchrun, or submitit's tasks)."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if "SUBMITIT_EXECUTOR" in os.environ:
        return int(os.environ.get("SLURM_NTASKS", os.environ.get("SUBMITIT_LOCAL_NTASKS", "1")))
    return 1


def _export_submitit_env() -> None:
    """RANK, WORLD_SIZE, MASTER_ADDR/PORT from submitit's job environment (one task per GPU)."""
    if "RANK" in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


_CURRENT = Dist()


def current() -> Dist:
    """The process group this process joined (the single-process default if none)."""
    return _CURRENT


def init_distributed(device: str) -> Dist:
    """Join the process group the environment describes (idempotent); one process: ``Dist()``."""
    global _CURRENT
    if _CURRENT.enabled or env_world_size() <= 1:
        return _CURRENT
    _export_submitit_env()
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    cuda = device != "cpu" and device != "mps" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30))
    _CURRENT = Dist(rank, world, local, dist.new_group(backend=backend))
    return _CURRENT


def rank_device(spec: str, d: Dist) -> str:
    """``recipe.device`` for this rank: each rank takes ``cuda:<LOCAL_RANK>``."""
    if not d.enabled or not (spec in ("auto", "cuda") and torch.cuda.is_available()):
        if d.enabled and spec.startswith("cuda:"):
            raise ConfigError(
                f"recipe.device={spec!r} with {d.world_size} ranks: each rank takes cuda:<LOCAL_RANK>; "
                "use recipe.device=auto or cuda"
            )
        return spec
    return f"cuda:{d.local_rank}"


def destroy() -> None:
    global _CURRENT
    if dist.is_initialized():
        dist.destroy_process_group()
    _CURRENT = Dist()


# ------------------------------------------------------------------------------------ strategies
def wrap_model(model: nn.Module, strategy: str, d: Dist, device: torch.device) -> nn.Module:
    """The module the training forward calls. ``ddp``: DistributedDataParallel over the trainable
    tensors only (frozen ones are not reduced). No ``find_unused_parameters``: every trainable
    tensor is in the graph of every step (the dense gate gives each expert a gradient, zeros for
    an idle one; the grouped path's grouped GEMM covers all experts; ALoRA masks, never drops).
    ``fsdp``: FSDP2 ``fully_shard`` of every decoder layer and the root, in place (see
    :func:`shard_fsdp`); the returned module is the model itself."""
    if not d.enabled:
        return model
    if strategy == "fsdp":
        shard_fsdp(model)
        return model

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)  # buffers equal by construction


@contextlib.contextmanager
def gradient_sync(net: nn.Module, sync: bool) -> Iterator[None]:
    """Gradient accumulation: reduce across ranks only on the last micro-batch of a step (DDP's
    ``no_sync``, FSDP2's ``set_requires_gradient_sync``); wrap forward and backward."""
    if hasattr(net, "no_sync") and not sync:
        with net.no_sync():
            yield
    elif hasattr(net, "set_requires_gradient_sync"):
        net.set_requires_gradient_sync(sync)
        yield
    else:
        yield


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a causal LM (``model.layers``, GPT-2's ``transformer.h``)."""
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers"):
        with contextlib.suppress(AttributeError):
            blocks = model.get_submodule(path)
            if isinstance(blocks, nn.ModuleList) and len(blocks):
                return list(blocks)
    raise ConfigError(f"recipe.strategy=fsdp: cannot find the decoder layers of {type(model).__name__}")


def shard_fsdp(model: nn.Module) -> None:
    """FSDP2: each decoder layer one shard group (frozen base and its adapters, which keep
    ``adapter.dtype``: FSDP2 asks one dtype of the trainable tensors of a group, not of the frozen
    ones), then the root (embeddings, head)."""
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) parameter gathered whole; a plain tensor as is. Collective under FSDP."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ------------------------------------------------------------------------------------------ spawn
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ |= {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    try:
        fn(*args)
    finally:
        destroy()


def spawn(nproc: int, fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` in ``nproc`` local processes forming one process group
    (``recipe.nproc_per_node``). A failing worker stops the others and raises here. Forked where
    CUDA is absent (no re-import of torch and transformers: ~10 s a worker on a laptop core);
    spawned fresh where it is present (CUDA does not survive a fork)."""
    method = "spawn" if torch.cuda.is_available() else "fork"
    mp.start_processes(_worker, args=(nproc, free_port(), fn, args), nprocs=nproc, join=True, start_method=method)
