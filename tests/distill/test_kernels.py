"""The Triton vocabulary-row kernel (distill.kernels) against the eager losses. On machines without a GPU
the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py before Triton loads)."""

import pytest
import torch

from distill.losses import VocabLossWeights, fused_vocab_losses, logit_mse_loss, mlm_loss, soft_target_loss

triton = pytest.importorskip("triton")
# Masked lanes compute -inf - -inf before a tl.where discards them; the interpreter (numpy) warns about it.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def make(N, C, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, C, generator=g)).to(dtype).requires_grad_()
    W = (torch.randn(V, C, generator=g) * 0.5).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(dtype).requires_grad_()
    h_t, W_t, b_t = torch.randn(N, C, generator=g), torch.randn(V, C, generator=g) * 0.5, torch.randn(V, generator=g)
    labels = torch.full((N,), -100)
    picked = torch.randperm(N, generator=g)[: N // 3]
    labels[picked] = torch.randint(0, V, (len(picked),), generator=g)
    return h, W, b, h_t.to(dtype), W_t.to(dtype), b_t.to(dtype), labels


def run(kernel, alphas, tensors, n_ce, n_mlm, monkeypatch, chunk):
    monkeypatch.setattr("distill.losses._chunk_rows", lambda V, device: chunk)
    h, W, b, h_t, W_t, b_t, labels = [x.detach().clone().requires_grad_(x.requires_grad) for x in tensors]
    w = VocabLossWeights(*alphas, temperature=2.0, kernel=kernel)
    total, ce, mlm, mse = fused_vocab_losses(h, W, b, h_t, W_t, b_t, labels, w, n_ce, n_mlm)
    (total * 3.0).backward()  # a non-unit upstream gradient, as DDP's world-size scaling
    return [total, ce, mlm, mse], [h.grad, W.grad, b.grad]


@pytest.mark.parametrize("alphas", [(5.0, 2.0, 0.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.5), (2.0, 1.0, 0.3)])
def test_triton_kernel_equals_eager_fp32(alphas, monkeypatch):
    # V not a multiple of the kernel's block, several chunks, a short last chunk, global normalisers as tensors.
    tensors = make(11, 8, 5000, torch.float32)
    n_ce, n_mlm = torch.tensor(17.0), torch.tensor(6.0)
    vals_e, grads_e = run("eager", alphas, tensors, n_ce, n_mlm, monkeypatch, chunk=4)
    vals_t, grads_t = run("triton", alphas, tensors, n_ce, n_mlm, monkeypatch, chunk=4)
    for got, exp in zip(vals_t, vals_e):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)
    for got, exp in zip(grads_t, grads_e):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-6 * exp.abs().max().item())


def test_triton_kernel_equals_the_pure_functions():
    # Independent of the eager chunk code: the reference formulas on full logits, float64.
    h, W, b, h_t, W_t, b_t, labels = make(7, 6, 300, torch.float32, seed=3)
    w = VocabLossWeights(5.0, 2.0, 0.5, temperature=2.0, kernel="triton")
    total, ce, mlm, mse = fused_vocab_losses(h, W, b, h_t, W_t, b_t, labels, w, 7.0, 3.0)
    total.backward()
    h64, W64, b64 = (x.detach().double().requires_grad_() for x in (h, W, b))
    s, t = h64 @ W64.t() + b64, h_t.double() @ W_t.double().t() + b_t.double()
    ref = 5.0 * soft_target_loss(s, t, 2.0, 7.0) + 2.0 * mlm_loss(s, labels, 3.0) + 0.5 * logit_mse_loss(s, t, 7.0)
    ref.backward()
    torch.testing.assert_close(total.double(), ref.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mlm.double(), mlm_loss(s, labels, 3.0).double(), rtol=1e-5, atol=1e-5)
    for got, exp in zip((h.grad, W.grad, b.grad), (h64.grad, W64.grad, b64.grad)):
        torch.testing.assert_close(got.double(), exp, rtol=1e-4, atol=1e-5 * exp.abs().max().item())


def test_triton_kernel_in_bf16_matches_eager_bf16(monkeypatch):
    # bf16 logits (the GPU path): the same GEMMs; the kernel's fp32 arithmetic and bf16 gradient follow the
    # eager path within bf16 rounding of g.
    tensors = make(9, 16, 700, torch.bfloat16, seed=5)
    vals_e, grads_e = run("eager", (5.0, 2.0, 0.0), tensors, 9.0, 3.0, monkeypatch, chunk=5)
    vals_t, grads_t = run("triton", (5.0, 2.0, 0.0), tensors, 9.0, 3.0, monkeypatch, chunk=5)
    for got, exp in zip(vals_t[:3], vals_e[:3]):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)
    for got, exp in zip(grads_t, grads_e):
        torch.testing.assert_close(got.float(), exp.float(), rtol=2e-2, atol=2e-2 * exp.abs().max().item())


def test_triton_kernel_without_grad_and_with_no_labelled_rows(monkeypatch):
    h, W, b, h_t, W_t, b_t, labels = make(5, 4, 130, torch.float32, seed=7)
    labels[:] = -100
    outs = {}
    for kernel in ("eager", "triton"):
        with torch.no_grad():
            outs[kernel] = fused_vocab_losses(h, W, b, h_t, W_t, b_t, labels,
                                              VocabLossWeights(1.0, 1.0, 0.0, 2.0, kernel=kernel), 5.0, 1.0)
    for got, exp in zip(outs["triton"], outs["eager"]):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)
    assert outs["triton"][2] == 0


def test_triton_kernel_with_an_aligned_vocabulary(monkeypatch):
    # V a multiple of the GEMM alignment: no padding columns at all.
    tensors = make(6, 8, 256, torch.float32, seed=9)
    vals_e, grads_e = run("eager", (5.0, 2.0, 0.0), tensors, 6.0, 2.0, monkeypatch, chunk=4)
    vals_t, grads_t = run("triton", (5.0, 2.0, 0.0), tensors, 6.0, 2.0, monkeypatch, chunk=4)
    for got, exp in zip(vals_t + grads_t, vals_e + grads_e):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-6 * max(1.0, exp.abs().max().item()))
