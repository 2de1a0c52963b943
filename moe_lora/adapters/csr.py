"""Top-k expert compute on the CPU as sparse matrices: the work follows the k chosen experts, with
no per-expert step anywhere.

Each token's update is ``sum_j w_j B_e(j) A_e(j) x``. Written as matrices over all ``E*r`` expert
columns, the hidden ``H = x A`` is needed only at the chosen experts' ``k*r`` columns of each row:
a CSR pattern. So

- forward: ``H = SDDMM(pattern; x, A)`` (sampled dense-dense matmul), ``out += (w * H) @ B`` (SpMM);
- backward: ``dB = (w H)^T g``, ``d(wH) = SDDMM(pattern; g, B^T)``, ``dx = (w dH) A^T``,
  ``dA = x^T (w dH)``, the transposed products through the transposed pattern.

Every kernel reads the activations once and writes the result once (no ``T*k x d`` gathered copy,
no scatter back), and none loops over experts. torch's CPU ``_grouped_mm`` does: one ``mm`` (plus a
select and a slice) per expert per GEMM, 10,696 kernel calls in a 64-expert training step of the
benchmark's tiny model against 1,456 at 8 experts, which is what made the grouped step grow with E.
How the grouped step's time grows with E against the dense gate's, measured by ``moe-lora bench
--experts``: the generated page docs/results/experts.md.

torch's sparse CPU kernels (MKL) take float32/float64 only: under bfloat16 autocast the expert
update is computed in float32 and added in the base output's dtype (the adapter's weights are
float32 anyway). The pattern is built from the router's choices on the host; null experts'
picks (AdaMoE, index ``num_experts``) are dropped from it, so they cost nothing.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

# torch warns once per process that CSR tensors are "in beta"; the kernels used here are tested
# against the dense gate (tests/adapters/test_grouped.py), so it would only alarm users of the grouped path.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state", category=UserWarning)


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _spmm(sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``sparse @ dense`` into a fresh row-major result: ``torch.sparse.mm`` zero-fills a result and
    copies it back (3.4 against 1.0 ms for a (1024 x 128, 16 a row) @ (128 x 688) product); with
    ``beta=0`` the uninitialised result is never read (NaNs in it stay out, tested)."""
    return dense.new_empty(sparse.shape[0], dense.shape[1]).addmm_(sparse, dense, beta=0.0)


class Pattern:
    """Where the ``(T, E*r)`` hidden is needed, as CSR twice: token-major rows (``crow``, ``col``)
    and, for the transposed products, expert-column-major rows (``crow_t``, ``col_t``) with
    ``perm_t`` taking values from the first order to the second. ``pairs`` are the flat indices
    (token * k + choice) of the real picks, in token order.

    Index arithmetic on the host in numpy and int32 (MKL's index type): torch's per-op overhead
    on these 16K-element integer arrays made the pattern cost 0.9 ms a layer; numpy takes a third."""

    def __init__(self, expert: torch.Tensor, num_experts: int, rank: int) -> None:
        tokens, k = expert.shape
        choices = expert.numpy().astype(np.int32)
        # each row's picks in ascending expert order (CSR rows with sorted columns), the real ones only
        if k == 2:  # one comparison instead of a thousand two-element sorts
            swap = (choices[:, 0] > choices[:, 1]).astype(np.int32)
            within = np.stack([swap, 1 - swap], 1)
        else:
            within = np.argsort(choices, axis=1, kind="stable").astype(np.int32)
        pairs = (within + np.arange(0, tokens * k, k, dtype=np.int32)[:, None]).ravel()
        e = choices.ravel()[pairs]
        real = e < num_experts
        if not real.all():
            pairs, e = pairs[real], e[real]
        per_token = (choices < num_experts).sum(-1, dtype=np.int32) * rank
        self.shape, self.rank = (tokens, num_experts * rank), rank
        self.pairs = torch.from_numpy(pairs.astype(np.int64))
        self.crow = torch.from_numpy(np.concatenate([[0], np.cumsum(per_token)]).astype(np.int32))
        col = ((e * rank)[:, None] + np.arange(rank, dtype=np.int32)).ravel()
        self.col = torch.from_numpy(col)
        # the transpose: entries by column, each column's in token order. A stable sort of the
        # column indices gives exactly that; as 16-bit keys numpy sorts them by radix (9x faster)
        keys = col.astype(np.uint16) if num_experts * rank <= 65535 else col
        perm_t = np.argsort(keys, kind="stable").astype(np.int32)
        self.perm_t = torch.from_numpy(perm_t)
        self.col_t = torch.from_numpy(pairs[perm_t // rank] // k)
        per_column = np.repeat(np.bincount(e, minlength=num_experts), rank)
        self.crow_t = torch.from_numpy(np.concatenate([[0], np.cumsum(per_column)]).astype(np.int32))

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        return _csr(self.crow, self.col, values, self.shape)

    def transposed(self, values: torch.Tensor) -> torch.Tensor:
        """The transpose of :meth:`matrix` (``values`` in token-major order)."""
        return _csr(self.crow_t, self.col_t, values.index_select(0, self.perm_t), self.shape[::-1])

    def sample(self, a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
        """``(a @ b_t.T)`` at the pattern's entries, token-major. ``b_t`` is row-major: the kernel
        reads ``b`` column by column and would copy a row-major ``b`` first."""
        empty = self.matrix(a.new_zeros(self.col.numel()))  # beta=0 still reads it: 0 * NaN is NaN
        return torch.sparse.sampled_addmm(empty, a, b_t.t(), beta=0.0).values()


class _CSRExperts(torch.autograd.Function):
    """``out += M @ B`` with ``M = pattern(w * x A)``, in place on ``out``."""

    @staticmethod
    def forward(ctx, out, x, A, B, w, pattern: Pattern):
        a_t = A.t().contiguous()  # (E*r, d_in): both SDDMM and dx's SpMM read it row by row
        h = pattern.sample(x, a_t)
        w = w.repeat_interleave(pattern.rank)  # each pick's weight on its r entries
        delta = pattern.matrix(h * w)
        if out.dtype == B.dtype:
            out.addmm_(delta, B)
        else:  # bfloat16 autocast: computed in float32, added in the base output's dtype
            out.add_(_spmm(delta, B).to(out.dtype))
        ctx.mark_dirty(out)
        ctx.save_for_backward(x, a_t, B, w, h)
        ctx.pattern = pattern
        return out

    @staticmethod
    def backward(ctx, g):
        x, a_t, B, w, h = ctx.saved_tensors
        pattern: Pattern = ctx.pattern
        g32 = g.to(B.dtype).contiguous()
        d_hw = pattern.sample(g32, B)  # d(w*h) at the entries
        dh = d_hw * w
        need_x, need_a, need_b = ctx.needs_input_grad[1:4]
        dx = _spmm(pattern.matrix(dh), a_t) if need_x else None
        d_a = _spmm(pattern.transposed(dh), x).t() if need_a else None
        d_b = _spmm(pattern.transposed(h * w), g32) if need_b else None
        return g, dx, d_a, d_b, (d_hw * h).view(-1, pattern.rank).sum(-1), None


def csr_update_(
    out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    expert: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    num_experts: int,
    scaling: float,
) -> None:
    """``out += scaling * sum_j weight_j B_e(j) A_e(j) x`` over each token's k choices, through CSR
    kernels. Arguments as :func:`moe_lora.adapters.layer.grouped_update_`'s; ``A`` and ``B`` in the
    adapter's float32 (``x`` is cast to it)."""
    rank = A.shape[1] // num_experts
    pattern = Pattern(expert, num_experts, rank)
    w = weight.reshape(-1).index_select(0, pattern.pairs).to(A.dtype) * scaling  # (P,): one per real pick
    with torch.autocast(x.device.type, enabled=False):  # autocast would cast the kernels' inputs to 16 bits
        _CSRExperts.apply(out, x.to(A.dtype).contiguous(), A, B, w, pattern)
