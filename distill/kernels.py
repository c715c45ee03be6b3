"""Triton kernel for the vocabulary losses on GPUs: one program per row, two passes over its logits.

`distill.losses._FusedVocabLosses` computes, chunk by chunk, the student's tempered logits s = (h W^T + b)/T
and the teacher's t (n, V) with two GEMMs, then needs per row the soft-target KL, the MLM cross-entropy
and the logit MSE, and the gradient of their weighted sum with respect to the student's raw logits:

    g = c_ce (softmax(s) - softmax(t)) + c_mlm [labelled rows] (softmax(T s) - onehot(y)) + c_mse T (s - t)

with c_ce = T a_ce / n_ce, c_mlm = a_mlm / n_mlm, c_mse = 2 a_mse / n_ce (the normalisers are device
tensors, read by the kernel: nothing waits for the GPU). Eagerly this is ~12 passes over (n, V) fp32
temporaries; here it is two reads of s and t and one write of g, in place of s, in the GEMMs' dtype:

    pass 1: online max / sum-exp of s, t and T s, sum_v e^(t_v - m) (t_v - s_v), sum (T (s - t))^2
            -> KL = sum_v p_v (t_v - s_v) - lse(t) + lse(s), CE = lse(T s) - T s_y
    pass 2: g from the row's log-normalisers, written over s.

Interpreted on the CPU (TRITON_INTERPRET=1) by the tests; compiled by Triton on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _vocab_rows_kernel(S, T_, LABELS, STATS, SCALES, V, stride_s, stride_t, temperature,
                       HAS_CE: tl.constexpr, HAS_MLM: tl.constexpr, HAS_MSE: tl.constexpr, NEED_T: tl.constexpr,
                       WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    t_row = T_ + row * stride_t
    cols = tl.arange(0, BLOCK)

    m_s = float("-inf")
    d_s = 0.0
    m_t = float("-inf")
    d_t = 0.0
    a_t = 0.0
    m_1 = float("-inf")
    d_1 = 0.0
    sq = 0.0
    for off in range(0, V, BLOCK):
        c = off + cols
        valid = c < V
        s = tl.load(s_row + c, mask=valid, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_s, tl.max(s, axis=0))
        d_s = d_s * tl.exp(m_s - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
        m_s = m_new
        if HAS_MLM:
            s1 = s * temperature
            m1_new = tl.maximum(m_1, tl.max(s1, axis=0))
            d_1 = d_1 * tl.exp(m_1 - m1_new) + tl.sum(tl.exp(s1 - m1_new), axis=0)
            m_1 = m1_new
        if NEED_T:
            t = tl.load(t_row + c, mask=valid, other=float("-inf")).to(tl.float32)
            if HAS_CE:
                mt_new = tl.maximum(m_t, tl.max(t, axis=0))
                rescale = tl.exp(m_t - mt_new)
                e_t = tl.exp(t - mt_new)
                d_t = d_t * rescale + tl.sum(e_t, axis=0)
                a_t = a_t * rescale + tl.sum(tl.where(valid, e_t * (t - s), 0.0), axis=0)
                m_t = mt_new
            if HAS_MSE:
                diff = tl.where(valid, (s - t) * temperature, 0.0)
                sq += tl.sum(diff * diff, axis=0)

    lse_s = m_s + tl.log(d_s)
    lse_t = 0.0
    lse_1 = 0.0
    label = tl.load(LABELS + row)
    labelled = label >= 0
    kl = 0.0
    nll = 0.0
    if HAS_CE:
        lse_t = m_t + tl.log(d_t)
        kl = (a_t / d_t - lse_t + lse_s) * temperature * temperature
    if HAS_MLM:
        lse_1 = m_1 + tl.log(d_1)
        s_y = tl.load(s_row + tl.maximum(label, 0), mask=labelled, other=0.0).to(tl.float32)
        nll = tl.where(labelled, lse_1 - s_y * temperature, 0.0)
    tl.store(STATS + row * 3 + 0, kl)
    tl.store(STATS + row * 3 + 1, nll)
    tl.store(STATS + row * 3 + 2, sq)

    if WRITE_GRAD:
        c_ce = tl.load(SCALES + 0)
        c_mlm = tl.where(labelled, tl.load(SCALES + 1), 0.0)
        c_mse = tl.load(SCALES + 2)
        for off in range(0, V, BLOCK):
            c = off + cols
            valid = c < V
            s = tl.load(s_row + c, mask=valid, other=0.0).to(tl.float32)
            g = tl.zeros([BLOCK], dtype=tl.float32)
            if NEED_T:
                t = tl.load(t_row + c, mask=valid, other=0.0).to(tl.float32)
                if HAS_CE:
                    g += c_ce * (tl.exp(s - lse_s) - tl.exp(t - lse_t))
                if HAS_MSE:
                    g += c_mse * (s - t) * temperature
            if HAS_MLM:
                g += c_mlm * (tl.exp(s * temperature - lse_1) - tl.where(c == label, 1.0, 0.0))
            tl.store(s_row + c, g.to(S.dtype.element_ty), mask=valid)


def vocab_rows(s: torch.Tensor, t: torch.Tensor | None, labels: torch.Tensor, scales: torch.Tensor,
               temperature: float, has_ce: bool, has_mlm: bool, has_mse: bool,
               write_grad: bool, vocab_size: int | None = None) -> torch.Tensor:
    """Per-row (KL·T², MLM NLL, squared logit difference) (n, 3) fp32 for tempered logits s, t (n, V);
    with `write_grad`, s is overwritten by the logit gradient g (module docstring). labels (n,) int64,
    -100 for rows without an MLM target; scales (3,) fp32 = (c_ce, c_mlm, c_mse) on s's device.
    vocab_size: the real vocabulary when s and t carry padding columns after it (left untouched)."""
    n, V = s.shape[0], vocab_size or s.shape[1]
    if s.stride(1) != 1 or (t is not None and t.stride(1) != 1):
        raise ValueError("vocab_rows needs row-contiguous logits")
    stats = torch.empty(n, 3, dtype=torch.float32, device=s.device)
    if n == 0:
        return stats
    block = min(4096, triton.next_power_of_2(V))
    t_arg = s if t is None else t
    _vocab_rows_kernel[(n,)](s, t_arg, labels, stats, scales, V, s.stride(0), t_arg.stride(0), float(temperature),
                             HAS_CE=has_ce, HAS_MLM=has_mlm, HAS_MSE=has_mse, NEED_T=has_ce or has_mse,
                             WRITE_GRAD=write_grad, BLOCK=block,
                             num_warps=8 if block >= 2048 else 4)
    return stats
