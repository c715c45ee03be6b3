"""Distillation losses as small pure functions. Each says its formula, which positions it covers and how
it reduces. `normalizer` (default: the number of positions given) lets the trainer divide by a count
taken over all processes and accumulation steps, so a step's loss is the mean over the whole optimizer
batch whatever the number of processes.

Notation: s, t student / teacher logits (N, V); T temperature; h hidden states; N selected rows.
References: Hinton et al. 2015 (soft targets), Sanh et al. 2019 (DistilBERT triple loss), Jiao et al.
2020 (TinyBERT hidden/attention MSE), Wang et al. 2020 (MiniLM attention KL).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _norm(normalizer: float | torch.Tensor | None, n: int) -> float | torch.Tensor:
    return max(n, 1) if normalizer is None else normalizer


def soft_target_loss(s: torch.Tensor, t: torch.Tensor, temperature: float,
                     normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), summed over the N given rows / normalizer.

    Rows are every non-padding token, or only the masked ones (`restrict_ce_to_mask`); the caller
    selects them. The T^2 keeps gradient magnitudes comparable across temperatures (Hinton et al.).
    """
    log_q = F.log_softmax(s.float() / temperature, dim=-1)
    log_p = F.log_softmax(t.float() / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum()
    return kl * temperature**2 / _norm(normalizer, s.size(0))


def mlm_loss(s: torch.Tensor, labels: torch.Tensor, normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the student (T = 1) at masked positions: -sum log softmax(s)[y] / normalizer.
    labels: (N,), -100 where a row has no MLM target."""
    keep = labels != -100
    ce = F.cross_entropy(s.float(), labels, ignore_index=-100, reduction="sum")
    return ce / _norm(normalizer, int(keep.sum()))


def logit_mse_loss(s: torch.Tensor, t: torch.Tensor, normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """sum (s - t)^2 over the N rows and V logits / normalizer (the reference's `alpha_mse`)."""
    return ((s.float() - t.float()) ** 2).sum() / _norm(normalizer, s.size(0))


def cosine_loss(h_s: torch.Tensor, h_t: torch.Tensor, mask: torch.Tensor,
                normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """sum over non-padding tokens of 1 - cos(h_s, h_t) / normalizer. h: (B, T, C), equal widths;
    mask: (B, T) bool, True for real tokens."""
    if h_s.size(-1) != h_t.size(-1):
        raise ValueError(f"cosine loss needs equal widths (student {h_s.size(-1)}, teacher {h_t.size(-1)})")
    cos = F.cosine_similarity(h_s[mask].float(), h_t[mask].float(), dim=-1)  # (N,)
    return (1 - cos).sum() / _norm(normalizer, int(mask.sum()))


def hidden_mse_loss(h_s: torch.Tensor, h_t: torch.Tensor, mask: torch.Tensor,
                    normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """TinyBERT hidden-state MSE: sum over real tokens of mean_c (h_s W - h_t)^2 / normalizer.
    The caller applies the learned projection W where widths differ."""
    return F.mse_loss(h_s[mask].float(), h_t[mask].float(), reduction="none").mean(-1).sum() / _norm(
        normalizer, int(mask.sum()))


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


# ------------------------------------------------------------------------------ fused vocabulary losses
@dataclass
class VocabLossWeights:
    alpha_ce: float
    alpha_mlm: float
    alpha_mse: float
    temperature: float
    compile: bool = False  # fuse the soft-target arithmetic with torch.compile (needs a C++ compiler on CPU)


def soft_target_rows(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For tempered logits s = s/T, t = t/T (n, V): per-row KL(p || q) (n,) and q - p (n, V), where
    p = softmax(t), q = softmax(s), using KL = sum_v p_v (t_v - s_v) - lse(t) + lse(s)."""
    p = torch.softmax(t, dim=-1)
    kl = (p * (t - s)).sum(-1) - torch.logsumexp(t, dim=-1) + torch.logsumexp(s, dim=-1)
    return kl, torch.softmax(s, dim=-1) - p


_compiled_soft_target_rows = None


def _soft_target_rows_fn(compile: bool):
    global _compiled_soft_target_rows
    if not compile:
        return soft_target_rows
    if _compiled_soft_target_rows is None:
        # One fused loop instead of ~10 memory passes over (n, V); dynamic: the last chunk is shorter.
        _compiled_soft_target_rows = torch.compile(soft_target_rows, dynamic=True)
    return _compiled_soft_target_rows


def _chunk_rows(vocab_size: int, device: torch.device) -> int:
    if device.type == "cpu":
        # < 8M floats (32 MB) per (rows, V) temporary: under glibc's 32 MB mmap ceiling, so the allocator
        # reuses heap memory instead of mapping and unmapping vocabulary-sized buffers every step.
        return max(1, ((1 << 23) - (1 << 16)) // vocab_size)
    # GPUs: the caching allocator reuses blocks, and small chunks would leave the GEMMs and kernel launches
    # underused; 128M floats (512 MB) per temporary (~4,400 rows for BERT's vocabulary) keeps memory bounded.
    return max(1, (1 << 27) // vocab_size)


class _FusedVocabLosses(torch.autograd.Function):
    """alpha_ce * soft_target_loss + alpha_mlm * mlm_loss + alpha_mse * logit_mse_loss, computed from
    the student's transformed rows h (N, C) and its projection (W, b) in row chunks, with the teacher's
    logits produced chunk by chunk too. The (N, V) logits are never materialised; gradients for h, W, b
    are formed in the forward pass, chunk by chunk (as Liger-Kernel's fused linear cross-entropy).

    Per row, with s' = s/T, t' = t/T, p = softmax(t'), q = softmax(s'):
        KL(p || q) = sum_v p_v (t'_v - s'_v) - lse(t') + lse(s'),   d(T^2 KL)/ds = T (q - p)
    (`soft_target_rows`; optionally compiled into one fused loop, since on CPU these elementwise passes
    over (n, V), not the matmuls, dominate the step)."""

    @staticmethod
    def forward(ctx, h, W, b, h_t, W_t, b_t, labels, weights: VocabLossWeights, n_ce, n_mlm, dtype):
        T = weights.temperature
        need_grad = any(ctx.needs_input_grad[:3])
        Wc, bc = W.to(dtype), b.to(dtype)  # dtype: the GEMMs' (autocast's, else h's)
        half = dtype in (torch.bfloat16, torch.float16)
        t_dtype = dtype if half else h_t.dtype
        W_tc, b_tc = W_t.to(t_dtype), b_t.to(t_dtype)
        grad_h = torch.empty_like(h, dtype=torch.float32) if need_grad else None
        grad_W = torch.zeros_like(W, dtype=torch.float32) if need_grad else None
        grad_b = torch.zeros_like(b, dtype=torch.float32) if need_grad else None
        sums = torch.zeros(3, dtype=torch.float32, device=h.device)  # ce, mlm, mse
        ce_scale = T * weights.alpha_ce / n_ce  # d(a_ce * T^2 KL / n_ce)/ds = ce_scale * (q - p)
        step = _chunk_rows(W.size(0), h.device)
        soft_target = _soft_target_rows_fn(weights.compile)
        for i in range(0, h.size(0), step):
            hc = h[i : i + step].to(dtype)
            s = torch.addmm(bc, hc, Wc.t(), beta=1 / T, alpha=1 / T).float()  # (n, V) = s / T
            hc_t = h_t[i : i + step].to(t_dtype)
            t = torch.addmm(b_tc, hc_t, W_tc.t(), beta=1 / T, alpha=1 / T).float()  # (n, V) = t / T
            g, scale = None, 1.0  # the chunk's logit gradient is scale * g
            if weights.alpha_ce:
                kl, q_minus_p = soft_target(s, t)  # (n,), (n, V)
                sums[0] += kl.sum() * T * T
                if need_grad:
                    g, scale = q_minus_p, ce_scale
            lab = labels[i : i + step]
            keep = lab != -100
            if weights.alpha_mlm and bool(keep.any()):
                log_s = F.log_softmax(s[keep] * T, dim=-1)  # (k, V), the student at T = 1
                target = lab[keep]
                sums[1] += -log_s.gather(1, target[:, None]).sum()
                if need_grad:
                    gm = log_s.exp_()
                    gm[torch.arange(gm.size(0), device=gm.device), target] -= 1
                    if g is None:
                        g, scale = torch.zeros_like(s), weights.alpha_mlm / n_mlm
                    g[keep] += gm * (weights.alpha_mlm / n_mlm / scale)
            if weights.alpha_mse:
                diff = (s - t) * T
                sums[2] += (diff * diff).sum()
                if need_grad:
                    if g is None:
                        g, scale = torch.zeros_like(s), 2 * weights.alpha_mse / n_ce
                    g += diff * (2 * weights.alpha_mse / n_ce / scale)
            if need_grad:
                if g is None:
                    grad_h[i : i + step] = 0
                    continue
                gc = g.to(dtype)
                grad_h[i : i + step] = (gc @ Wc).float().mul_(scale)
                if half:
                    # a half-precision GEMM (fp32 accumulation inside), as autocast's backward; summed in fp32
                    grad_W.add_(gc.t() @ hc, alpha=scale)
                else:
                    grad_W.addmm_(gc.t().float(), hc.float(), alpha=scale)
                grad_b.add_(g.sum(0), alpha=scale)
        ce, mlm, mse = sums[0] / n_ce, sums[1] / n_mlm, sums[2] / n_ce
        total = weights.alpha_ce * ce + weights.alpha_mlm * mlm + weights.alpha_mse * mse
        if need_grad:
            ctx.save_for_backward(grad_h.to(h.dtype), grad_W.to(W.dtype), grad_b.to(b.dtype))
        ctx.mark_non_differentiable(ce, mlm, mse)
        return total, ce, mlm, mse

    @staticmethod
    def backward(ctx, grad_total, *_):
        grad_h, grad_W, grad_b = ctx.saved_tensors
        if grad_total.item() != 1.0:  # in place: these buffers are ours and used once
            for g in (grad_h, grad_W, grad_b):
                g.mul_(grad_total)
        return grad_h, grad_W, grad_b, *([None] * 8)


def fused_vocab_losses(h: torch.Tensor, W: torch.Tensor, b: torch.Tensor, h_t: torch.Tensor, W_t: torch.Tensor,
                       b_t: torch.Tensor, labels: torch.Tensor, weights: VocabLossWeights,
                       n_ce: float, n_mlm: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, ce, mlm, mse) for rows h (N, C) with labels (N,) (-100: no MLM target), where
    total = a_ce * soft_target_loss(s, t, T, n_ce) + a_mlm * mlm_loss(s, labels, n_mlm)
            + a_mse * logit_mse_loss(s, t, n_ce), s = h W^T + b, t = h_t W_t^T + b_t.
    Memory: O(chunk x V) instead of O(N x V) for logits, probabilities and their gradients.
    Under autocast the vocabulary GEMMs run in autocast's dtype (as a Linear would); the softmax
    arithmetic and the gradient sums are fp32."""
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    with torch.autocast(device, enabled=False):
        return _FusedVocabLosses.apply(h, W, b, h_t, W_t, b_t, labels, weights, float(max(n_ce, 1)),
                                       float(max(n_mlm, 1)), dtype)
