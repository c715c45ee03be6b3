"""The shared distillation step (distill.step) against the straightforward computation it replaces: full
B x T x V logits of transformers' BERT teacher and our student on the padded batch, rows picked with a mask,
the pure loss functions of distill.losses. float64, so any difference in what is computed shows."""

import pytest
import torch
from accelerate import Accelerator
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertForMaskedLM

from distill.flops import step_flops
from distill.losses import attention_kl_loss, cosine_loss, hidden_mse_loss, logit_mse_loss, mlm_loss, soft_target_loss
from distill.recipes import LossConfig
from distill.step import DistillationModel, DistillationStep, encoder_shape, layer_pairs
from students.config import create_model_config
from students.init import init_from_teacher
from students.modeling import DistilBERTForMaskedLM, DistilBERTModel, TokenLayout
from teachers.teacher import Teacher

V = 30522


def make_batch(B, T, padded, seed, mask_p=0.3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, T + 1, (B,), generator=g) if padded else torch.full((B,), T)
    lengths[0] = T
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    ids = torch.randint(1000, V, (B, T), generator=g) * mask
    picked = (torch.rand(B, T, generator=g) < mask_p) & mask.bool()
    picked[:, 0] = True  # every sequence has an MLM target
    labels = torch.where(picked, ids, torch.full_like(ids, -100))
    return {"input_ids": torch.where(picked, torch.full_like(ids, 103), ids), "attention_mask": mask, "labels": labels}


def models(dtype=torch.float64, attn="sdpa"):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    bert = BertForMaskedLM._from_config(config, attn_implementation=attn).to(dtype).eval()
    with torch.no_grad():  # spread the teacher's logits: soft targets far from uniform
        bert.bert.embeddings.word_embeddings.weight.mul_(30)
    student = init_from_teacher(bert, [0, 3]).to(dtype)
    with torch.no_grad():  # a student that disagrees with its teacher
        for p in student.distilbert.transformer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    for m in student.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return bert, student


def reference(bert, student, batch, cfg, pairs):
    """Losses of the global batch and the student's gradients, the plain way."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    real = mask.bool()
    with torch.no_grad():
        t = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=cfg.alpha_attn > 0)
    s = student(ids, mask, output_hidden_states=True, output_attentions=cfg.alpha_attn > 0)
    rows = labels != -100 if cfg.restrict_ce_to_mask else real
    T = cfg.temperature
    losses = {"ce": soft_target_loss(s.logits[rows], t.logits[rows], T),
              "mlm": mlm_loss(s.logits[rows], labels[rows], int((labels != -100).sum())),
              "mse": logit_mse_loss(s.logits[rows], t.logits[rows]) if cfg.alpha_mse else torch.zeros(())}
    total = cfg.alpha_ce * losses["ce"] + cfg.alpha_mlm * losses["mlm"] + cfg.alpha_mse * losses["mse"]
    if cfg.alpha_cos:
        losses["cos"] = sum(cosine_loss(s.hidden_states[i], t.hidden_states[j], real)
                            for i, j in pairs["cos"]) / len(pairs["cos"])
        total = total + cfg.alpha_cos * losses["cos"]
    if cfg.alpha_hidden_mse:
        losses["hidden_mse"] = sum(hidden_mse_loss(s.hidden_states[i], t.hidden_states[j], real)
                                   for i, j in pairs["hidden"]) / len(pairs["hidden"])
        total = total + cfg.alpha_hidden_mse * losses["hidden_mse"]
    if cfg.alpha_attn:
        losses["attn"] = sum(attention_kl_loss(s.attentions[i - 1], t.attentions[j - 1], real)
                             for i, j in pairs["attn"]) / len(pairs["attn"])
        total = total + cfg.alpha_attn * losses["attn"]
    losses["total"] = total
    total.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    return {k: v.item() for k, v in losses.items()}, grads


CASES = {
    "packed/all": (False, LossConfig()),
    "padded/all": (True, LossConfig()),
    "packed/masked": (False, LossConfig(restrict_ce_to_mask=True)),
    "padded/masked": (True, LossConfig(restrict_ce_to_mask=True)),
    "padded/intermediate": (True, LossConfig(alpha_mse=0.5, alpha_hidden_mse=1.0, alpha_attn=1.0,
                                             layer_map=[[0, 0], [1, 2], [2, 4]])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_shared_step_equals_the_reference_losses_and_gradients(case):
    padded, cfg = CASES[case]
    bert, student = models(attn="eager" if cfg.alpha_attn else "sdpa")
    pairs = layer_pairs(cfg, 2, 4)
    micro = [make_batch(3, 12, padded, seed) for seed in (1, 2)]  # two micro-batches: global normalisers
    ref_student = DistilBERTForMaskedLM(student.config).to(torch.float64).eval()
    ref_student.load_state_dict(student.state_dict())
    ref_losses, ref_grads = reference(bert, ref_student, {k: torch.cat([m[k] for m in micro]) for k in micro[0]},
                                      cfg, pairs)

    accelerator = Accelerator(cpu=True)
    model = DistillationModel(student, 32, cfg, pairs, "eager").eval()  # eval: no dropout anywhere
    before = {n: p.detach().clone() for n, p in model.student.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # new = old - grad: the update is the gradient
    step = DistillationStep(accelerator, model, Teacher(bert), optimizer, clip_grad_norm=1e9)
    result = step([step.prepare(m) for m in micro])

    assert set(result.losses) == set(ref_losses)
    for k, v in ref_losses.items():
        assert result.losses[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    after = dict(model.student.named_parameters())
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for n, g in ref_grads.items():
        # (the reference's loss functions run their softmax arithmetic in fp32, as ours: 1e-6 of the gradients'
        # scale; a key bias's gradient is zero but for rounding)
        torch.testing.assert_close(before[n] - after[n].detach(), g, rtol=1e-6, atol=1e-6 * scale,
                                   msg=lambda m, n=n: f"{n}: {m}")
    real = sum(int(m["attention_mask"].sum()) for m in micro)
    assert result.tokens == real and result.mlm_tokens == sum(int((m["labels"] != -100).sum()) for m in micro)


def test_token_rows_equal_padded_execution_forward_and_backward():
    torch.manual_seed(0)
    model = DistilBERTModel(create_model_config("tiny", dropout=0.0, attention_dropout=0.0)).train()
    batch = make_batch(4, 16, True, seed=5)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    layout = TokenLayout.from_mask(mask)
    assert layout.index is not None and layout.n_tokens == int(mask.sum())
    weights = torch.randn(layout.n_tokens, 32)

    padded = model(ids, mask, output_hidden_states=True).hidden_states
    (layout.gather(padded[-1]) * weights).sum().backward()
    g_padded = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    rows = model.forward_rows(ids, layout)
    (rows[-1] * weights).sum().backward()
    for a, b in zip(padded, rows):
        torch.testing.assert_close(b, layout.gather(a), rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g_padded[n], rtol=1e-5, atol=1e-5, msg=n)


def test_layout_is_built_on_the_host_and_refuses_left_padding():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    layout = TokenLayout.from_mask(mask)
    assert layout.cu_seqlens.tolist() == [0, 3, 7] and layout.max_len == 4 and layout.positions.tolist() == [
        0, 1, 2, 0, 1, 2, 3]
    assert TokenLayout.from_mask(torch.ones(2, 3, dtype=torch.long)).index is None  # packed: no gather at all
    with pytest.raises(ValueError, match="right-padded"):
        TokenLayout.from_mask(torch.tensor([[0, 1, 1]]))
    with pytest.raises(ValueError, match="no real token"):
        TokenLayout.from_mask(torch.tensor([[1, 1], [0, 0]]))


def counted_flops(step, batch):
    """FlopCounterMode over one whole step (teacher forward, student forward/backward, fused losses),
    with attention through SDPA's math backend (whose matmuls the counter sees)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step([step.prepare(batch)])
    return counter.get_total_flops()


@pytest.mark.parametrize("mode", ["all", "masked"])
def test_flop_count_matches_flop_counter_mode(mode):
    cfg = LossConfig(restrict_ce_to_mask=mode == "masked")
    bert, student = models(dtype=torch.float32)
    pairs = layer_pairs(cfg, 2, 4)
    model = DistillationModel(student, 32, cfg, pairs, "eager").train()
    step = DistillationStep(Accelerator(cpu=True), model, Teacher(bert),
                            torch.optim.AdamW(model.parameters(), lr=1e-4), clip_grad_norm=1.0)
    shapes = dict(teacher=encoder_shape(bert.config), student=encoder_shape(student.config), vocab=V, loss_cfg=cfg,
                  pairs=pairs, projected=[])

    # Packed (no padding): the whole step at once.
    packed = make_batch(4, 16, False, seed=7)
    rows = int(packed["attention_mask"].sum() if mode == "all" else (packed["labels"] != -100).sum())
    ours = step_flops(n_tokens=64, sum_sq_len=4 * 16**2, n_rows=rows, **shapes)["total"]
    assert ours == pytest.approx(counted_flops(step, packed), rel=0.05)
    assert step.prepare(packed).norms[3].item() == pytest.approx(ours, rel=1e-6)

    # Padded: the analytic count is of the real tokens only (attention on each sequence's real length),
    # which is what the counter sees when every sequence runs on its own, unpadded.
    padded = make_batch(4, 16, True, seed=8)
    lengths = padded["attention_mask"].sum(1).tolist()
    labelled = (padded["labels"] != -100).sum(1).tolist()
    per_sequence = sum(counted_flops(step, {k: v[i : i + 1, : lengths[i]] for k, v in padded.items()})
                       for i in range(4))
    ours = step_flops(n_tokens=sum(lengths), sum_sq_len=sum(n * n for n in lengths),
                      n_rows=sum(lengths) if mode == "all" else sum(labelled), **shapes)["total"]
    assert ours == pytest.approx(per_sequence, rel=0.05)
    assert step.prepare(padded).norms[3].item() == pytest.approx(ours, rel=1e-6)


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_step():
    """train.compile: the same losses and updates with each block torch.compiled (fp32 on the CPU, both
    layouts, several sizes so the symbolic-shape graphs are exercised)."""
    from distill.step import compile_blocks

    results = {}
    for compiled in (False, True):
        bert, student = models(dtype=torch.float32)
        cfg = LossConfig()
        pairs = layer_pairs(cfg, 2, 4)
        model = DistillationModel(student, 32, cfg, pairs, "eager").train()
        teacher = Teacher(bert)
        if compiled:
            compile_blocks([*student.distilbert.transformer.layer, *teacher.blocks])
        step = DistillationStep(Accelerator(cpu=True), model, teacher, torch.optim.SGD(model.parameters(), lr=0.1))
        batches = [make_batch(B, 16, padded, seed) for seed, (B, padded) in
                   enumerate([(2, False), (3, False), (2, True), (4, True), (3, True)])]
        results[compiled] = ([step([step.prepare(b)]).losses["total"] for b in batches],
                             {n: p.detach().clone() for n, p in model.named_parameters()})
    (eager, w_eager), (comp, w_comp) = results[False], results[True]
    assert comp == pytest.approx(eager, rel=1e-5)
    for n, w in w_eager.items():
        torch.testing.assert_close(w_comp[n], w, rtol=1e-5, atol=1e-6, msg=n)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate fixes mixed precision once per process; these tests need their own (accelerate's own
    tests reset it the same way)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_half_precision_teacher_runs_outside_autocast_by_default(fresh_accelerate_state):
    """A bf16 teacher runs in bf16 end to end (its outputs stay bf16); an fp32 one runs under the step's
    autocast. Either way the bf16 step's losses agree with the autocast-everywhere step within bf16 rounding."""
    bert, student = models(dtype=torch.float32)
    cfg = LossConfig()
    pairs = layer_pairs(cfg, 2, 4)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    batch = make_batch(3, 12, True, seed=4)
    fp32_step = DistillationStep(accelerator, DistillationModel(student, 32, cfg, pairs), Teacher(bert),
                                 torch.optim.SGD(student.parameters(), lr=0.0))
    assert fp32_step.teacher_autocast
    losses = {}
    for autocast in (None, True):
        model = DistillationModel(student, 32, cfg, pairs).eval()
        step = DistillationStep(accelerator, model, Teacher(bert.to(torch.bfloat16)),
                                torch.optim.SGD(model.parameters(), lr=0.0), teacher_autocast=autocast)
        assert step.teacher_autocast is (autocast is True)
        losses[autocast] = step([step.prepare(batch)]).losses
    for k, v in losses[True].items():
        assert losses[None][k] == pytest.approx(v, rel=2e-2, abs=1e-3), k
