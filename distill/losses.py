"""Distillation losses as small pure functions. Each says its formula, which positions it covers and how
it reduces. `normalizer` (default: the number of positions given) lets the trainer divide by a count
taken over all processes and accumulation steps, so a step's loss is the mean over the whole optimizer
batch whatever the number of processes.

Notation: s, t student / teacher logits (N, V); T temperature; h hidden states; N selected rows.
References: Hinton et al. 2015 (soft targets), Sanh et al. 2019 (DistilBERT triple loss), Jiao et al.
2020 (TinyBERT hidden/attention MSE), Wang et al. 2020 (MiniLM attention KL and value relation), Wang et
al. 2021 (MiniLM v2 Q-Q / K-K / V-V relations), Agarwal et al. 2024 / TRL (generalised JSD).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _norm(normalizer: float | torch.Tensor | None, n: int) -> float | torch.Tensor:
    return max(n, 1) if normalizer is None else normalizer


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tv")


def divergence_rows(s: torch.Tensor, t: torch.Tensor, divergence: str = "forward_kl",
                    beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence (n,) between p = softmax(t) (teacher) and q = softmax(s) (student), for
    already tempered logits (autograd-friendly reference; the fused loss has the closed-form gradients):
        forward_kl  KL(p || q) = sum p (log p - log q)              (Hinton et al.; DistilBERT)
        reverse_kl  KL(q || p) = sum q (log q - log p)              (mode-seeking; MiniLLM, DistillKit)
        jsd         beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q, 0 < beta < 1
                    (TRL's generalised JSD; beta = 0.5 is the Jensen-Shannon divergence)
        tv          1/2 sum |p - q|                                (total variation)"""
    log_q, log_p = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    if divergence == "forward_kl":
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if divergence == "reverse_kl":
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    if divergence == "jsd":
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
        return (beta * (log_p.exp() * (log_p - log_m)).sum(-1)
                + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1))
    if divergence == "tv":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise ValueError(f"divergence {divergence!r} is not one of {DIVERGENCES}")


def soft_target_loss(s: torch.Tensor, t: torch.Tensor, temperature: float,
                     normalizer: float | torch.Tensor | None = None, divergence: str = "forward_kl",
                     beta: float = 0.5) -> torch.Tensor:
    """T^2 * D(softmax(t/T), softmax(s/T)), summed over the N given rows / normalizer; D is the forward
    KL (the paper's) or another of `divergence_rows`.

    Rows are every non-padding token, or only the masked ones (`restrict_ce_to_mask`); the caller
    selects them. The T^2 keeps gradient magnitudes comparable across temperatures (Hinton et al.); it
    is applied to every divergence alike, so their weights compare at any T.
    """
    d = divergence_rows(s.float() / temperature, t.float() / temperature, divergence, beta)
    return d.sum() * temperature**2 / _norm(normalizer, s.size(0))


def mlm_loss(s: torch.Tensor, labels: torch.Tensor, normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the student (T = 1) at masked positions: -sum log softmax(s)[y] / normalizer.
    labels: (N,), -100 where a row has no MLM target."""
    keep = labels != -100
    ce = F.cross_entropy(s.float(), labels, ignore_index=-100, reduction="sum")
    return ce / _norm(normalizer, int(keep.sum()))


def logit_mse_loss(s: torch.Tensor, t: torch.Tensor, normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """sum (s - t)^2 over the N rows and V logits / normalizer (`alpha_mse` of the original `distillation/` scripts)."""
    return ((s.float() - t.float()) ** 2).sum() / _norm(normalizer, s.size(0))


def _real(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return h.reshape(-1, h.size(-1)) if mask is None else h[mask]


def cosine_loss(h_s: torch.Tensor, h_t: torch.Tensor, mask: torch.Tensor | None,
                normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """sum over non-padding tokens of 1 - cos(h_s, h_t) / normalizer. h: (B, T, C) with mask (B, T) bool,
    True for real tokens; or token rows (N, C) with mask None. Equal widths."""
    if h_s.size(-1) != h_t.size(-1):
        raise ValueError(f"cosine loss needs equal widths (student {h_s.size(-1)}, teacher {h_t.size(-1)})")
    a, b = _real(h_s, mask), _real(h_t, mask)
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1)  # (N,)
    return (1 - cos).sum() / _norm(normalizer, a.size(0))


def hidden_mse_loss(h_s: torch.Tensor, h_t: torch.Tensor, mask: torch.Tensor | None,
                    normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """TinyBERT hidden-state MSE: sum over real tokens of mean_c (h_s W - h_t)^2 / normalizer (shapes as
    `cosine_loss`). The caller applies the learned projection W where widths differ."""
    a, b = _real(h_s, mask), _real(h_t, mask)
    return F.mse_loss(a.float(), b.float(), reduction="none").mean(-1).sum() / _norm(normalizer, a.size(0))


def attention_kl_loss(a_s: torch.Tensor, a_t: torch.Tensor, mask: torch.Tensor,
                      normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """MiniLM attention transfer: KL(A_t || A_s) per head and real query row, averaged over heads,
    summed over real queries / normalizer. a: (B, nh, T, T) probabilities; mask (B, T) bool."""
    if a_s.shape != a_t.shape:
        raise ValueError("attention loss needs equal head counts and lengths: "
                         f"{tuple(a_s.shape)} vs {tuple(a_t.shape)}")
    eps = 1e-12
    p, q = a_t.float(), a_s.float()
    kl = (p * (torch.log(p + eps) - torch.log(q + eps))).sum(-1)  # (B, nh, T)
    kl = kl.mean(1)[mask]  # (N,)
    return kl.sum() / _norm(normalizer, int(mask.sum()))


# ------------------------------------------------------------------------------ MiniLM relations
def self_relation(x: torch.Tensor, n_heads: int, mask: torch.Tensor) -> torch.Tensor:
    """log softmax(x_a x_a^T / sqrt(d_a)) per relation head a: x (B, T, C) split into n_heads slices of
    d_a = C / n_heads features; padding keys (mask (B, T) False) are out of the softmax. -> (B, A, T, T)."""
    B, T, C = x.shape
    if C % n_heads:
        raise ValueError(f"{n_heads} relation heads do not divide the width {C}")
    d = C // n_heads
    xa = x.to(torch.promote_types(x.dtype, torch.float32)).view(B, T, n_heads, d).transpose(1, 2)  # (B, A, T, d)
    scores = xa @ xa.transpose(-2, -1) / math.sqrt(d)  # (B, A, T, T)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.log_softmax(scores, dim=-1)


def relation_kl_loss(x_s: torch.Tensor, x_t: torch.Tensor, n_heads: int, mask: torch.Tensor,
                     normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """One relation type of MiniLM v2 (Wang et al. 2021): KL(R_t || R_s) with R = `self_relation`, per
    relation head and real query row; mean over relation heads, sum over real queries / normalizer.
    x_s (B, T, C_s) and x_t (B, T, C_t) may differ in width: each is split into the same n_heads."""
    log_t, log_s = self_relation(x_t, n_heads, mask), self_relation(x_s, n_heads, mask)
    keys = mask[:, None, None, :]
    kl = torch.where(keys, log_t.exp() * (log_t - log_s), 0.0).sum(-1)  # (B, A, T)
    kl = kl.mean(1)[mask]  # (N,)
    return kl.sum() / _norm(normalizer, int(mask.sum()))


def minilm_v2_loss(qkv_s: tuple[torch.Tensor, ...], qkv_t: tuple[torch.Tensor, ...], n_relation_heads: int,
                   mask: torch.Tensor, normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """MiniLM v2 multi-head self-attention relation distillation: the sum over Q-Q, K-K and V-V of
    `relation_kl_loss`, for the queries, keys and values (all heads concatenated, (B, T, C)) of one teacher
    layer and of the student's last layer."""
    return sum(relation_kl_loss(xs, xt, n_relation_heads, mask, normalizer) for xs, xt in zip(qkv_s, qkv_t))


def value_relation_loss(v_s: torch.Tensor, v_t: torch.Tensor, heads_s: int, heads_t: int, mask: torch.Tensor,
                        normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """MiniLM v1 value relation: KL(softmax(V_t V_t^T / sqrt(d_k)) || same for the student) per attention
    head (the models' own heads, so their counts must be equal), mean over heads, summed over real queries."""
    if heads_s != heads_t:
        raise ValueError(f"MiniLM v1's value relation needs equal head counts (student {heads_s}, teacher "
                         f"{heads_t}); use MiniLM v2 relations (loss.alpha_relation) with relation heads")
    return relation_kl_loss(v_s, v_t, heads_s, mask, normalizer)


# ------------------------------------------------------------------------------ fused vocabulary losses
KERNELS = ("eager", "compiled", "triton")


@dataclass
class VocabLossWeights:
    alpha_ce: float
    alpha_mlm: float
    alpha_mse: float
    temperature: float
    # How the per-row arithmetic over (n, V) runs: "eager" (PyTorch ops; the CPU default), "compiled"
    # (those ops fused by torch.compile; needs a C++ compiler on CPU) or "triton" (distill.kernels: two
    # passes, gradient written in place; the CUDA default; forward KL only).
    kernel: str = "eager"
    divergence: str = "forward_kl"  # of the soft-target term: see divergence_rows
    beta: float = 0.5  # the generalised JSD's mixture weight

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"vocabulary loss kernel {self.kernel!r} is not one of {KERNELS}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence {self.divergence!r} is not one of {DIVERGENCES}")
        if self.kernel == "triton" and self.divergence != "forward_kl" and self.alpha_ce:
            raise ValueError(f"the Triton vocabulary kernel computes the forward KL only; divergence "
                             f"{self.divergence!r} needs loss_kernel eager or compiled")

    @property
    def needs_teacher_logits(self) -> bool:
        return bool(self.alpha_ce or self.alpha_mse)

    @property
    def any(self) -> bool:
        return bool(self.alpha_ce or self.alpha_mlm or self.alpha_mse)


def soft_target_rows(s: torch.Tensor, t: torch.Tensor, divergence: str = "forward_kl",
                     beta: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """For tempered logits s = s/T, t = t/T (n, V): per-row D(p, q) (n,) and its gradient dD/ds (n, V),
    p = softmax(t), q = softmax(s). With u = dD/dq, dD/ds = q (u - <q, u>) (the softmax Jacobian):
        forward_kl  KL = sum_v p_v (t_v - s_v) - lse(t) + lse(s)        dD/ds = q - p
        reverse_kl  KL = sum_v q_v (s_v - t_v) - lse(s) + lse(t)        u = log q - log p (+1, cancels)
        jsd         (formula in divergence_rows)                        u = (1 - beta) (log q - log m)
        tv          1/2 sum |p - q|                                     u = sign(q - p) / 2"""
    if divergence == "forward_kl":
        p = torch.softmax(t, dim=-1)
        kl = (p * (t - s)).sum(-1) - torch.logsumexp(t, dim=-1) + torch.logsumexp(s, dim=-1)
        return kl, torch.softmax(s, dim=-1) - p
    log_q, log_p = torch.log_softmax(s, dim=-1), torch.log_softmax(t, dim=-1)
    q = log_q.exp()
    if divergence == "reverse_kl":
        u = log_q - log_p
        d = (q * u).sum(-1)
    elif divergence == "jsd":
        p = log_p.exp()
        log_m = torch.log(beta * p + (1 - beta) * q)
        d = beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
        u = (1 - beta) * (log_q - log_m)
    elif divergence == "tv":
        diff = q - log_p.exp()
        d = 0.5 * diff.abs().sum(-1)
        u = 0.5 * torch.sign(diff)
    else:
        raise ValueError(f"divergence {divergence!r} is not one of {DIVERGENCES}")
    return d, q * (u - (q * u).sum(-1, keepdim=True))


_compiled_soft_target_rows: dict = {}


def _soft_target_rows_fn(compile: bool, divergence: str, beta: float):
    if not compile:
        return functools.partial(soft_target_rows, divergence=divergence, beta=beta)
    key = (divergence, beta)
    if key not in _compiled_soft_target_rows:
        # One fused loop instead of ~10 memory passes over (n, V); dynamic: the last chunk is shorter.
        _compiled_soft_target_rows[key] = torch.compile(
            functools.partial(soft_target_rows, divergence=divergence, beta=beta), dynamic=True)
    return _compiled_soft_target_rows[key]


def _chunk_rows(vocab_size: int, device: torch.device) -> int:
    if device.type == "cpu":
        # < 8M floats (32 MB) per (rows, V) temporary: under glibc's 32 MB mmap ceiling, so the allocator
        # reuses heap memory instead of mapping and unmapping vocabulary-sized buffers every step.
        return max(1, ((1 << 23) - (1 << 16)) // vocab_size)
    # GPUs: the caching allocator reuses blocks, and small chunks would leave the GEMMs and kernel launches
    # underused; 128M elements per temporary (4,352 rows for BERT's vocabulary, a multiple of the GEMM
    # tiles) keeps memory bounded.
    return max(64, (1 << 27) // vocab_size // 64 * 64)


# The Triton path runs its vocabulary GEMMs on the vocabulary padded with zero rows to a multiple of this:
# 30,522 logits per row are not a 16-byte multiple, which keeps cuBLAS off Hopper's TMA GEMM kernels (an
# H100 profile of the step showed these GEMMs in sm80 kernels, ~1/3 of the step). Padded logits are 0
# (zero weights and bias); the kernel reads only the first V columns and the gradients are cut back to V.
VOCAB_ALIGN = 64


def _eager_rows(s: torch.Tensor, t: torch.Tensor | None, lab: torch.Tensor, weights: VocabLossWeights,
                scales: list[float], sums: torch.Tensor, need_grad: bool) -> tuple[torch.Tensor | None, float]:
    """The per-row arithmetic of one chunk with PyTorch ops (fp32 s, t). Adds the chunk's (KL·T², MLM NLL,
    squared difference) sums into `sums`; returns (g, scale): the logit gradient is scale * g (None: zero).
    The scale is applied to the (n, C) GEMM outputs, not to the (n, V) g: one pass fewer on the CPU."""
    T = weights.temperature
    c_ce, c_mlm, c_mse = scales
    g, scale = None, 1.0
    if weights.alpha_ce:
        rows = _soft_target_rows_fn(weights.kernel == "compiled", weights.divergence, weights.beta)
        d, grad_s = rows(s, t)  # (n,), (n, V)
        sums[0] += d.sum() * T * T
        if need_grad:
            g, scale = grad_s, c_ce
    if weights.alpha_mlm:
        keep = lab != -100  # on the CPU this indexing costs nothing; CUDA steps use the Triton kernel
        log_s = F.log_softmax(s[keep] * T, dim=-1)  # (k, V), the student at T = 1
        target = lab[keep]
        sums[1] += -log_s.gather(1, target[:, None]).sum()
        if need_grad:
            gm = log_s.exp_()
            gm[torch.arange(gm.size(0), device=gm.device), target] -= 1
            if g is None:
                g, scale = torch.zeros_like(s), c_mlm
            g[keep] += gm * (c_mlm / scale)
    if weights.alpha_mse:
        diff = (s - t) * T
        sums[2] += (diff * diff).sum()
        if need_grad:
            if g is None:
                g, scale = torch.zeros_like(s), c_mse
            g += diff * (c_mse / scale)
    return g, scale


class _FusedVocabLosses(torch.autograd.Function):
    """alpha_ce * soft_target_loss + alpha_mlm * mlm_loss + alpha_mse * logit_mse_loss, computed from
    the student's transformed rows h (N, C) and its projection (W, b) in row chunks, with the teacher's
    logits produced chunk by chunk too. The (N, V) logits are never materialised; gradients for h, W, b
    are formed in the forward pass, chunk by chunk (as Liger-Kernel's fused linear cross-entropy).

    Per row, with s' = s/T, t' = t/T, p = softmax(t'), q = softmax(s'):
        KL(p || q) = sum_v p_v (t'_v - s'_v) - lse(t') + lse(s'),   d(T^2 KL)/ds = T (q - p)
    (other divergences: `soft_target_rows`, with the same T^2 and the same chunking)
    The normalisers n_ce, n_mlm may be device tensors: the Triton kernel reads them on the device, so a
    CUDA step never waits for the GPU here."""

    @staticmethod
    def forward(ctx, h, W, b, h_t, W_t, b_t, labels, weights: VocabLossWeights, n_ce, n_mlm, dtype):
        T = weights.temperature
        need_grad = any(ctx.needs_input_grad[:3])
        Wc, bc = W.to(dtype), b.to(dtype)  # dtype: the GEMMs' (autocast's, else h's)
        half = dtype in (torch.bfloat16, torch.float16)
        need_t = weights.needs_teacher_logits  # (without, the teacher's rows may be None: L_mlm alone)
        t_dtype = (dtype if half else h_t.dtype) if need_t else None
        W_tc, b_tc = (W_t.to(t_dtype), b_t.to(t_dtype)) if need_t else (None, None)
        grad_h = torch.empty_like(h, dtype=torch.float32) if need_grad else None
        grad_W = torch.zeros_like(W, dtype=torch.float32) if need_grad else None
        grad_b = torch.zeros_like(b, dtype=torch.float32) if need_grad else None
        # d(loss)/d(raw logit) coefficients: c_ce (q - p), c_mlm (softmax - onehot), c_mse (s - t) T.
        scales = torch.stack([T * weights.alpha_ce / n_ce, weights.alpha_mlm / n_mlm, 2 * weights.alpha_mse / n_ce])
        triton_kernel = weights.kernel == "triton"
        V = W.size(0)
        pad = (-V) % VOCAB_ALIGN if triton_kernel else 0
        if pad:
            Wc, bc = F.pad(Wc, (0, 0, 0, pad)), F.pad(bc, (0, pad))
            if need_t:
                W_tc, b_tc = F.pad(W_tc, (0, 0, 0, pad)), F.pad(b_tc, (0, pad))
        if triton_kernel:
            from distill.kernels import vocab_rows

            row_sums = []
        else:
            host_scales = scales.tolist()  # on the CPU this is free
            sums = torch.zeros(3, dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)  # ce, mlm, mse
        step = _chunk_rows(V, h.device)
        for i in range(0, h.size(0), step):
            hc = h[i : i + step].to(dtype)
            s = torch.addmm(bc, hc, Wc.t(), beta=1 / T, alpha=1 / T)  # (n, V) = s / T, in the GEMM's dtype
            t = None
            if need_t:
                hc_t = h_t[i : i + step].to(t_dtype)
                t = torch.addmm(b_tc, hc_t, W_tc.t(), beta=1 / T, alpha=1 / T)  # (n, V) = t / T
            lab = labels[i : i + step]
            if triton_kernel:
                row_sums.append(vocab_rows(s, t, lab, scales, T, bool(weights.alpha_ce), bool(weights.alpha_mlm),
                                           bool(weights.alpha_mse), need_grad, vocab_size=V).sum(0))
                g, scale = s, 1.0  # the kernel wrote the (scaled) logit gradient over s
            else:
                acc = torch.promote_types(s.dtype, torch.float32)  # fp32 arithmetic (fp64 stays fp64)
                g, scale = _eager_rows(s.to(acc), None if t is None else t.to(acc), lab, weights, host_scales, sums,
                                       need_grad)
            if need_grad:
                if g is None:
                    grad_h[i : i + step] = 0
                    continue
                gc = g.to(dtype)
                grad_h[i : i + step] = (gc @ Wc).float().mul_(scale) if scale != 1.0 else gc @ Wc
                # g's padding columns (if any) are 0 and dropped: the first V rows of g^T keep its aligned
                # leading dimension
                gct = gc.t()[:V]
                if half:
                    # a half-precision GEMM (fp32 accumulation inside), as autocast's backward; summed in fp32
                    grad_W.add_(gct @ hc, alpha=scale)
                else:
                    # (addmm with out=, not addmm_: the same kernel, and FLOP counters see it)
                    torch.addmm(grad_W, gct.float(), hc.float(), alpha=scale, out=grad_W)
                grad_b.add_(g[:, :V].sum(0, dtype=torch.float32), alpha=scale)
        if triton_kernel:
            sums = torch.stack(row_sums).sum(0) if row_sums else torch.zeros(3, device=h.device)
        ce, mlm, mse = sums[0] / n_ce, sums[1] / n_mlm, sums[2] / n_ce
        total = weights.alpha_ce * ce + weights.alpha_mlm * mlm + weights.alpha_mse * mse
        if need_grad:
            ctx.save_for_backward(grad_h.to(h.dtype), grad_W.to(W.dtype), grad_b.to(b.dtype))
        ctx.mark_non_differentiable(ce, mlm, mse)
        return total, ce, mlm, mse

    @staticmethod
    def backward(ctx, grad_total, *_):
        grad_h, grad_W, grad_b = ctx.saved_tensors
        # In place: these buffers are ours and used once. Skipped for a CPU 1.0 (free to test there); on a
        # GPU, multiplying is cheaper than asking the device what the scale is.
        if not (grad_total.device.type == "cpu" and grad_total.item() == 1.0):
            for g in (grad_h, grad_W, grad_b):
                g.mul_(grad_total.to(g.dtype))
        return grad_h, grad_W, grad_b, *([None] * 8)


def fused_vocab_losses(h: torch.Tensor, W: torch.Tensor, b: torch.Tensor, h_t: torch.Tensor | None,
                       W_t: torch.Tensor | None, b_t: torch.Tensor | None, labels: torch.Tensor,
                       weights: VocabLossWeights, n_ce: float | torch.Tensor,
                       n_mlm: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, ce, mlm, mse) for rows h (N, C) with labels (N,) (-100: no MLM target), where
    total = a_ce * soft_target_loss(s, t, T, n_ce) + a_mlm * mlm_loss(s, labels, n_mlm)
            + a_mse * logit_mse_loss(s, t, n_ce), s = h W^T + b, t = h_t W_t^T + b_t.
    n_ce, n_mlm: numbers or 0-dim tensors on h's device (counts over all processes), clamped to >= 1.
    The teacher's rows (h_t, W_t, b_t) are used only when a_ce or a_mse is non-zero.
    Memory: O(chunk x V) instead of O(N x V) for logits, probabilities and their gradients.
    Under autocast the vocabulary GEMMs run in autocast's dtype (as a Linear would); the softmax
    arithmetic and the gradient sums are fp32."""
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    n_ce, n_mlm = (torch.as_tensor(n, dtype=torch.float32, device=h.device).clamp(min=1) for n in (n_ce, n_mlm))
    with torch.autocast(device, enabled=False):
        return _FusedVocabLosses.apply(h, W, b, h_t, W_t, b_t, labels, weights, n_ce, n_mlm, dtype)
