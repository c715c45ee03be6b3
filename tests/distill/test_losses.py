import math

import pytest
import torch
import torch.nn.functional as F

from distill.losses import (
    VocabLossWeights,
    attention_kl_loss,
    cosine_loss,
    fused_vocab_losses,
    hidden_mse_loss,
    logit_mse_loss,
    mlm_loss,
    soft_target_loss,
)


def test_soft_target_loss_matches_reference_formula():
    s, t = torch.randn(7, 11), torch.randn(7, 11)
    T = 2.0
    # The reference: KLDivLoss(reduction="batchmean")(log_softmax(s/T), softmax(t/T)) * T^2
    ref = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T**2
    torch.testing.assert_close(soft_target_loss(s, t, T), ref)
    assert soft_target_loss(t, t, T).abs() < 1e-6
    torch.testing.assert_close(soft_target_loss(s, t, T, normalizer=14), ref / 2)


def test_mlm_loss_ignores_unlabelled_rows():
    s = torch.randn(5, 9)
    labels = torch.tensor([3, -100, 1, -100, 8])
    torch.testing.assert_close(mlm_loss(s, labels), F.cross_entropy(s[[0, 2, 4]], labels[[0, 2, 4]]))


def test_cosine_loss_over_real_tokens_only():
    h = torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]]).bool()
    other = h.clone()
    other[0, 2:] = torch.randn(2, 8)  # padding differs: must not count
    assert cosine_loss(h, other, mask).abs() < 1e-6
    flipped = h.clone()
    flipped[1, 0] = -h[1, 0]
    assert math.isclose(cosine_loss(flipped, h, mask).item(), 2 / 5, rel_tol=1e-5)


def test_hidden_and_logit_mse_and_attention_kl():
    h, g = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mask = torch.ones(2, 3, dtype=torch.bool)
    torch.testing.assert_close(hidden_mse_loss(h, g, mask), F.mse_loss(h, g))
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    torch.testing.assert_close(logit_mse_loss(s, t), F.mse_loss(s, t, reduction="sum") / 3)
    a = torch.softmax(torch.randn(2, 2, 3, 3), -1)
    assert attention_kl_loss(a, a, mask).abs() < 1e-6
    assert attention_kl_loss(torch.softmax(torch.randn(2, 2, 3, 3), -1), a, mask) > 0
    with pytest.raises(ValueError, match="head counts"):
        attention_kl_loss(a[:, :1], a, mask)


def fused_inputs(N=10, C=6, Ct=5, V=23):
    """fp64 student rows and projection (requiring grad), teacher rows and projection, labels on 4 rows."""
    h = torch.randn(N, C, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, C, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(N, Ct, dtype=torch.float64)
    W_t, b_t = torch.randn(V, Ct, dtype=torch.float64), torch.randn(V, dtype=torch.float64)
    labels = torch.full((N,), -100)
    labels[[1, 4, 5, 9]] = torch.tensor([3, 0, 22, 7])
    return h, W, b, h_t, W_t, b_t, labels


@pytest.mark.parametrize("alphas", [(5.0, 2.0, 0.0), (1.0, 0.0, 0.5), (0.0, 1.0, 0.0)])
def test_fused_vocab_losses_equal_the_pure_functions(alphas, monkeypatch):
    monkeypatch.setattr("distill.losses._chunk_rows", lambda V, device: 3)  # force several chunks
    h, W, b, h_t, W_t, b_t, labels = fused_inputs()
    w = VocabLossWeights(*alphas, temperature=2.0)
    n_ce, n_mlm = 13.0, 6.0  # "global" counts larger than local ones, as with several processes
    # without soft targets and logit MSE the step passes no teacher rows (L_mlm alone: the no-L_ce ablation)
    teacher = (h_t, W_t, b_t) if w.needs_teacher_logits else (None, None, None)
    total, ce, mlm, mse = fused_vocab_losses(h, W, b, *teacher, labels, w, n_ce, n_mlm)
    total.backward()
    fused_grads = [x.grad.clone() for x in (h, W, b)]
    for x in (h, W, b):
        x.grad = None
    s, t = h @ W.t() + b, h_t @ W_t.t() + b_t
    ref_ce, ref_mlm, ref_mse = soft_target_loss(s, t, 2.0, n_ce), mlm_loss(s, labels, n_mlm), logit_mse_loss(s, t, n_ce)
    ref = w.alpha_ce * ref_ce + w.alpha_mlm * ref_mlm + w.alpha_mse * ref_mse
    ref.backward()
    torch.testing.assert_close(total.double(), ref.double(), atol=1e-5, rtol=1e-5)
    for got, exp in zip(fused_grads, (h.grad, W.grad, b.grad)):
        torch.testing.assert_close(got.double(), exp, atol=1e-5, rtol=1e-5)
    if alphas[0]:
        torch.testing.assert_close(ce.double(), ref_ce.double(), atol=1e-5, rtol=1e-5)


def test_fused_vocab_losses_in_bf16_follow_fp32(monkeypatch):
    """Half-precision inputs (the autocast path) give fp32 gradients within bf16 rounding."""
    monkeypatch.setattr("distill.losses._chunk_rows", lambda V, device: 4)
    N, C, V = 12, 16, 40
    h, W, b = torch.randn(N, C), torch.randn(V, C) * 0.3, torch.randn(V)
    h_t, W_t, b_t = torch.randn(N, C), torch.randn(V, C) * 0.3, torch.randn(V)
    labels = torch.full((N,), -100)
    labels[[0, 5, 11]] = torch.tensor([1, 7, 39])
    w = VocabLossWeights(5.0, 2.0, 0.0, temperature=2.0)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        xs = [x.detach().to(dtype).requires_grad_() for x in (h, W, b)]
        total, *_ = fused_vocab_losses(*xs, h_t.to(dtype), W_t.to(dtype), b_t.to(dtype), labels, w, N, 3)
        total.backward()
        results.append((total.float(), [x.grad.float() for x in xs]))
    (t32, g32), (t16, g16) = results
    torch.testing.assert_close(t16, t32, rtol=2e-2, atol=2e-2)
    for got, exp in zip(g16, g32):
        torch.testing.assert_close(got, exp, rtol=5e-2, atol=5e-2 * exp.abs().max().item())
    # fp32 inputs under bf16 autocast run the same bf16 GEMMs as bf16 inputs (as a Linear would).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t_auto, *_ = fused_vocab_losses(h, W, b, h_t, W_t, b_t, labels, w, N, 3)
    torch.testing.assert_close(t_auto, t16, rtol=1e-6, atol=1e-6)
    assert (t_auto - t32).abs() > 1e-6


def test_fused_without_grad_returns_values_only():
    h, W, b = torch.randn(4, 3), torch.randn(9, 3), torch.randn(9)
    with torch.no_grad():
        total, *_ = fused_vocab_losses(h, W, b, h, W, b, torch.tensor([1, -100, 2, -100]),
                                       VocabLossWeights(1.0, 1.0, 0.0, 1.0), 4, 2)
    assert total.item() > 0 and not total.requires_grad


@pytest.mark.slow
def test_compiled_soft_target_matches_eager():
    from distill.losses import _soft_target_rows_fn, soft_target_rows

    s, t = torch.randn(7, 301), torch.randn(7, 301)
    kl, g = soft_target_rows(s, t)
    ckl, cg = _soft_target_rows_fn(True, "forward_kl", 0.5)(s, t)
    torch.testing.assert_close(ckl, kl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cg, g, atol=1e-6, rtol=1e-5)
    ref = F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="none").sum(-1)
    torch.testing.assert_close(kl, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- divergences
def naive_divergence(p: torch.Tensor, q: torch.Tensor, name: str, beta: float = 0.5) -> torch.Tensor:
    """Textbook formulas on probability rows, element by element (the independent reference)."""
    out = []
    for pr, qr in zip(p.tolist(), q.tolist()):
        if name == "forward_kl":
            out.append(sum(a * math.log(a / b) for a, b in zip(pr, qr)))
        elif name == "reverse_kl":
            out.append(sum(b * math.log(b / a) for a, b in zip(pr, qr)))
        elif name == "jsd":
            m = [beta * a + (1 - beta) * b for a, b in zip(pr, qr)]
            out.append(beta * sum(a * math.log(a / c) for a, c in zip(pr, m))
                       + (1 - beta) * sum(b * math.log(b / c) for b, c in zip(qr, m)))
        else:
            out.append(0.5 * sum(abs(a - b) for a, b in zip(pr, qr)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("name,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1),
                                       ("tv", 0.5)])
def test_divergences_match_their_formulas_and_vanish_at_identity(name, beta):
    from distill.losses import divergence_rows, soft_target_rows

    s, t = torch.randn(5, 11, dtype=torch.float64), torch.randn(5, 11, dtype=torch.float64)
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    torch.testing.assert_close(divergence_rows(s, t, name, beta), naive_divergence(p, q, name, beta))
    d, grad = soft_target_rows(s, t, name, beta)  # the fused path's closed-form value and gradient
    torch.testing.assert_close(d, naive_divergence(p, q, name, beta))
    s_ = s.clone().requires_grad_()
    divergence_rows(s_, t, name, beta).sum().backward()
    torch.testing.assert_close(grad, s_.grad)
    zero, zero_grad = soft_target_rows(t, t, name, beta)
    assert zero.abs().max() < 1e-12 and zero_grad.abs().max() < 1e-12
    if name == "jsd" and beta == 0.5:  # symmetric, bounded by log 2
        torch.testing.assert_close(divergence_rows(t, s, name), d)
        assert (d <= math.log(2)).all()


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tv"])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_divergences_equal_autograd_on_full_logits(name, masked, monkeypatch):
    """Every divergence inside the chunked vocabulary loss (no (N, V) logits) has the value and the
    gradients of autograd through the full logits; `masked` scores only the MLM rows, as
    restrict_ce_to_mask does (the caller selects the rows)."""
    monkeypatch.setattr("distill.losses._chunk_rows", lambda V, device: 3)
    T = 2.0
    h, W, b, h_t, W_t, b_t, labels = fused_inputs()
    rows = labels != -100 if masked else torch.ones(len(labels), dtype=torch.bool)
    w = VocabLossWeights(5.0, 2.0, 0.0, temperature=T, divergence=name, beta=0.3)
    total, ce, *_ = fused_vocab_losses(h[rows], W, b, h_t[rows], W_t, b_t, labels[rows], w, 13.0, 6.0)
    total.backward()
    fused = [x.grad.clone() for x in (h, W, b)]
    for x in (h, W, b):
        x.grad = None
    s, t = h[rows] @ W.t() + b, h_t[rows] @ W_t.t() + b_t
    ref_ce = soft_target_loss(s, t, T, 13.0, divergence=name, beta=0.3)
    ref = 5.0 * ref_ce + 2.0 * mlm_loss(s, labels[rows], 6.0)
    ref.backward()
    torch.testing.assert_close(total.double(), ref.double(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ce.double(), ref_ce.double(), atol=1e-6, rtol=1e-6)
    for got, exp in zip(fused, (h.grad, W.grad, b.grad)):
        torch.testing.assert_close(got.double(), exp, atol=1e-6, rtol=1e-6)


def test_triton_kernel_refuses_other_divergences():
    with pytest.raises(ValueError, match="forward KL only"):
        VocabLossWeights(1.0, 1.0, 0.0, 2.0, kernel="triton", divergence="jsd")


# ---------------------------------------------------------------------------------------- MiniLM relations
def naive_relation_kl(x_s, x_t, A, mask):
    """Loops over sequences, relation heads and real query rows; softmax over the real keys only."""
    total = 0.0
    for b in range(x_s.size(0)):
        real = mask[b].nonzero().squeeze(1)
        for i in real.tolist():
            per_head = []
            for a in range(A):
                ds, dt = x_s.size(-1) // A, x_t.size(-1) // A
                qs, qt = x_s[b, :, a * ds:(a + 1) * ds][real], x_t[b, :, a * dt:(a + 1) * dt][real]
                rs = torch.softmax(qs[real.tolist().index(i)] @ qs.t() / math.sqrt(ds), -1)
                rt = torch.softmax(qt[real.tolist().index(i)] @ qt.t() / math.sqrt(dt), -1)
                per_head.append((rt * (rt.log() - rs.log())).sum())
            total += torch.stack(per_head).mean()
    return total


def relation_inputs(widths=(8, 12), B=3, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 2:] = False
    qkv_s = tuple(torch.randn(B, T, widths[0], generator=g, dtype=torch.float64) for _ in range(3))
    qkv_t = tuple(torch.randn(B, T, widths[1], generator=g, dtype=torch.float64) for _ in range(3))
    return qkv_s, qkv_t, mask


@pytest.mark.parametrize("A", [1, 2, 4])
def test_minilm_v2_relations_equal_a_naive_implementation_at_mixed_widths(A):
    from distill.losses import minilm_v2_loss, relation_kl_loss

    qkv_s, qkv_t, mask = relation_inputs()  # student 8 wide, teacher 12 wide
    for xs, xt in zip(qkv_s, qkv_t):
        torch.testing.assert_close(relation_kl_loss(xs, xt, A, mask, normalizer=1.0).double(),
                                   naive_relation_kl(xs, xt, A, mask).double())
    expected = sum(naive_relation_kl(xs, xt, A, mask) for xs, xt in zip(qkv_s, qkv_t)) / 7.0
    torch.testing.assert_close(minilm_v2_loss(qkv_s, qkv_t, A, mask, 7.0).double(), expected.double())
    # padding does not leak: changing padded positions changes nothing
    moved = tuple(x.clone() for x in qkv_s)
    for x in moved:
        x[2, 3:] += 100.0
    torch.testing.assert_close(minilm_v2_loss(moved, qkv_t, A, mask), minilm_v2_loss(qkv_s, qkv_t, A, mask))


def test_relations_vanish_for_a_student_equal_to_its_teacher_and_have_gradients():
    from distill.losses import minilm_v2_loss, value_relation_loss

    qkv_s, qkv_t, mask = relation_inputs(widths=(12, 12))
    assert minilm_v2_loss(qkv_t, qkv_t, 3, mask).abs() < 1e-12
    assert value_relation_loss(qkv_t[2], qkv_t[2], 4, 4, mask).abs() < 1e-12
    xs = tuple(x.clone().requires_grad_() for x in qkv_s)
    loss = minilm_v2_loss(xs, qkv_t, 3, mask)
    loss.backward()
    assert loss > 0 and all(torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in xs)
    assert all((x.grad[2, 2:] == 0).all() for x in xs)  # padded rows get no gradient
    assert torch.autograd.gradcheck(lambda v: minilm_v2_loss((qkv_s[0], qkv_s[1], v), qkv_t, 3, mask),
                                    (qkv_s[2].clone().requires_grad_(),))
    with pytest.raises(ValueError, match="equal head counts"):
        value_relation_loss(qkv_s[2], qkv_t[2], 2, 4, mask)
    with pytest.raises(ValueError, match="do not divide"):
        minilm_v2_loss(qkv_s, qkv_t, 5, mask)
