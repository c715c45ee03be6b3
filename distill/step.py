"""One distillation step, shared by the trainer (distill.train) and the benchmarks:

    prepare (host)    layout of the real tokens, scored rows, loss normalisers and FLOPs, from the CPU batch
    step (device)     for each micro-batch: teacher forward on the real tokens -> student forward -> losses
                      -> backward; then clip -> one read of the step's numbers -> optimizer and LR step

Everything the device step needs to know about shapes (how many real tokens, which rows the vocabulary
losses score, the longest sequence) is computed on the host from the CPU batch, so the step never waits
for the GPU until its one read at the end (loss values, gradient norm and the global normalisers, needed to
stop on a non-finite loss before the optimizer applies it). The losses are divided by normalisers summed over all
processes and micro-batches of the optimizer step, so one process and N processes with the same global
batch compute the same loss and gradients.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from distill.flops import EncoderShape, step_flops
from distill.losses import (
    VocabLossWeights,
    attention_kl_loss,
    cosine_loss,
    fused_vocab_losses,
    hidden_mse_loss,
    minilm_v2_loss,
    value_relation_loss,
)
from distill.mechanics import NonFiniteLoss, OptimizerStep, require_finite
from distill.recipes import LossConfig, RecipeError
from students.modeling import DistilBERTForMaskedLM, TokenLayout
from teachers.teacher import Teacher

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ pairs
def layer_pairs(loss_cfg: LossConfig, n_student: int, n_teacher: int) -> dict[str, list[tuple[int, int]]]:
    """(student, teacher) hidden-state indices (0 = embeddings) for each intermediate loss."""
    if loss_cfg.layer_map is not None:
        pairs = [tuple(p) for p in loss_cfg.layer_map]
        bad = [p for p in pairs if not (0 <= p[0] <= n_student and 0 <= p[1] <= n_teacher)]
        if bad:
            raise RecipeError(f"loss.layer_map pairs {bad} out of range "
                              f"(student 0..{n_student}, teacher 0..{n_teacher})")
        out = {"cos": pairs, "hidden": pairs, "attn": [p for p in pairs if p[0] > 0 and p[1] > 0]}
    else:
        uniform = [(i, round(i * n_teacher / n_student)) for i in range(n_student + 1)]
        out = {"cos": [(n_student, n_teacher)], "hidden": uniform, "attn": uniform[1:]}
    layer = loss_cfg.relation_layer or n_teacher
    if not 1 <= layer <= n_teacher:
        raise RecipeError(f"loss.relation_layer={layer} is not a teacher layer (1..{n_teacher})")
    out["relation"] = [(n_student, layer)]  # the student's last layer receives the teacher layer's relations
    return out


# ------------------------------------------------------------------------------------------ batches
@dataclass
class StepBatch:
    """One micro-batch on its device, with what the host computed about it.

    Hidden states of both models are token rows (N, C) in `layout` order (padding never computed). The
    vocabulary losses score `scored` rows of those (None: every real token) with MLM targets `labels`.
    `norms` = (scored rows, MLM targets, real tokens, model FLOPs of the step on this micro-batch), float32
    on the device: summed over micro-batches and processes they are the losses' normalisers."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    layout: TokenLayout
    scored: torch.Tensor | None  # (R,) indices into the N token rows; None: all N
    labels: torch.Tensor  # (R,) MLM targets of the scored rows, -100 where none
    norms: torch.Tensor  # (4,) float32


@dataclass
class TeacherOutputs:
    """What the student's losses need from the teacher for one micro-batch (no autograd history)."""

    W: torch.Tensor  # (V, Ct) vocabulary projection
    b: torch.Tensor  # (V,)
    rows: torch.Tensor | None = None  # (R, Ct) transformed last hidden state at the scored rows
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (N, Ct) rows, for layers in use
    attentions: tuple[torch.Tensor, ...] | None = None  # (B, nh, T, T) per layer, for attention transfer
    qkv: tuple[torch.Tensor, ...] | None = None  # (N, Ct) queries, keys, values of the relation layer


@dataclass
class StepResult:
    """The numbers of one optimizer step (read from the device once)."""

    losses: dict[str, float]
    grad_norm: float
    rows: int
    mlm_tokens: int
    tokens: int  # real tokens over all processes and micro-batches
    flops: float  # model FLOPs over all processes and micro-batches (distill.flops)


# ------------------------------------------------------------------------------------------ the model
class DistillationModel(nn.Module):
    """What trains: the student, plus projections for hidden-state MSE between different widths.

    `forward` runs the student on one `StepBatch` and returns every loss; it is the module Accelerate wraps,
    so all the student's parameters are used inside the wrapped forward (as DDP and FSDP require).
    """

    def __init__(self, student: DistilBERTForMaskedLM, teacher_dim: int, loss_cfg: LossConfig,
                 pairs: dict[str, list[tuple[int, int]]], loss_kernel: str = "eager", teacher_heads: int = 0):
        super().__init__()
        self.student, self.loss_cfg, self.pairs = student, loss_cfg, pairs
        self.teacher_heads = teacher_heads  # MiniLM relations: the default relation heads, and v1's check
        self.relation_heads = loss_cfg.relation_heads or teacher_heads
        dim = student.config.dim
        self.projections = nn.ModuleList(
            [nn.Linear(dim, teacher_dim) if dim != teacher_dim else nn.Identity() for _ in pairs["hidden"]]
        ) if loss_cfg.alpha_hidden_mse else nn.ModuleList()
        self.weights = VocabLossWeights(loss_cfg.alpha_ce, loss_cfg.alpha_mlm, loss_cfg.alpha_mse,
                                        loss_cfg.temperature, loss_kernel, loss_cfg.divergence, loss_cfg.jsd_beta)

    def forward(self, batch: StepBatch, t: TeacherOutputs, norms: torch.Tensor) -> dict[str, torch.Tensor]:
        """norms: (4,) global normalisers of this optimizer step (StepBatch.norms summed)."""
        loss_cfg, layout = self.loss_cfg, batch.layout
        n_rows, n_mlm, n_tokens = norms[0], norms[1], norms[2]
        attentions = None
        if loss_cfg.alpha_attn:  # attention probabilities need the (B, T) layout; the losses then take rows
            out = self.student.distilbert(batch.input_ids, batch.attention_mask, output_hidden_states=True,
                                          output_attentions=True)
            hidden, attentions = [layout.gather(h) for h in out.hidden_states], out.attentions
        else:
            hidden = self.student.distilbert.forward_rows(batch.input_ids, layout)
        if self.weights.any:
            last = hidden[-1] if batch.scored is None else hidden[-1].index_select(0, batch.scored)
            proj = self.student.vocab_projector
            total, ce, mlm, mse = fused_vocab_losses(self.student.transform(last), proj.weight, proj.bias, t.rows, t.W,
                                                     t.b, batch.labels, self.weights, n_rows, n_mlm)
        else:
            total = ce = mlm = mse = norms.new_zeros(())
        losses = {"ce": ce, "mlm": mlm, "mse": mse}
        if loss_cfg.alpha_cos:
            cos = sum(cosine_loss(hidden[i], t.hidden[j], None, n_tokens)
                      for i, j in self.pairs["cos"]) / len(self.pairs["cos"])
            total = total + loss_cfg.alpha_cos * cos
            losses["cos"] = cos.detach()
        if loss_cfg.alpha_hidden_mse:
            hid = sum(hidden_mse_loss(p(hidden[i]), t.hidden[j], None, n_tokens)
                      for p, (i, j) in zip(self.projections, self.pairs["hidden"])) / len(self.pairs["hidden"])
            total = total + loss_cfg.alpha_hidden_mse * hid
            losses["hidden_mse"] = hid.detach()
        if loss_cfg.alpha_relation or loss_cfg.alpha_value_relation:
            (i, _), = self.pairs["relation"]
            attention = self.student.distilbert.transformer.layer[i - 1].attention
            x = hidden[i - 1]
            real = batch.attention_mask.bool()
            qkv_s = [layout.scatter(f(x)) for f in (attention.q_lin, attention.k_lin, attention.v_lin)]
            qkv_t = [layout.scatter(y) for y in t.qkv]
            if loss_cfg.alpha_relation:
                rel = minilm_v2_loss(qkv_s, qkv_t, self.relation_heads, real, n_tokens)
                total = total + loss_cfg.alpha_relation * rel
                losses["relation"] = rel.detach()
            if loss_cfg.alpha_value_relation:
                val = value_relation_loss(qkv_s[2], qkv_t[2], attention.n_heads, self.teacher_heads, real, n_tokens)
                total = total + loss_cfg.alpha_value_relation * val
                losses["value_relation"] = val.detach()
        if loss_cfg.alpha_attn:
            real = batch.attention_mask.bool()
            att = sum(attention_kl_loss(attentions[i - 1], t.attentions[j - 1], real, n_tokens)
                      for i, j in self.pairs["attn"]) / len(self.pairs["attn"])
            total = total + loss_cfg.alpha_attn * att
            losses["attn"] = att.detach()
        losses["total"] = total
        return losses


def teacher_outputs(teacher: Teacher, batch: StepBatch, loss_cfg: LossConfig, pairs: dict[str, list[tuple[int, int]]],
                    weights: VocabLossWeights) -> TeacherOutputs:
    """The teacher's side of one micro-batch: hidden rows of the layers some loss uses, the transformed last
    rows at the scored positions (the vocabulary projection is left to the fused loss: never B x T x V
    teacher logits), and attention probabilities when attention transfer is on."""
    W, b = teacher.projector
    out = TeacherOutputs(W=W, b=b)
    if loss_cfg.alpha_attn:
        full = teacher(batch.input_ids, batch.attention_mask, output_attentions=True)  # inference mode
        # cloned out of inference mode, so autograd may save them for the student's backward
        hidden = [batch.layout.gather(h).clone() for h in full.hidden_states]
        out.attentions = tuple(a.clone() for a in full.attentions)
    else:
        hidden = teacher.forward_rows(batch.input_ids, batch.layout)
    hidden_losses = loss_cfg.alpha_cos or loss_cfg.alpha_hidden_mse
    used = {j for key in ("cos", "hidden") for _, j in pairs[key]} if hidden_losses else ()
    out.hidden = {j: hidden[j] for j in used}
    if loss_cfg.alpha_relation or loss_cfg.alpha_value_relation:
        (_, j), = pairs["relation"]
        attention = teacher.blocks[j - 1].attention
        with torch.no_grad():
            x = hidden[j - 1]  # the layer's input rows
            out.qkv = (attention.q_lin(x), attention.k_lin(x), attention.v_lin(x))
    if weights.needs_teacher_logits:
        last = hidden[-1] if batch.scored is None else hidden[-1].index_select(0, batch.scored)
        with torch.no_grad():
            out.rows = teacher.transform(last)
    return out


def encoder_shape(config) -> EncoderShape:
    """EncoderShape of a DistilBertConfig (ours) or a BertConfig (a teacher's)."""
    if hasattr(config, "n_layers"):
        return EncoderShape(config.n_layers, config.dim, config.hidden_dim, config.n_heads)
    return EncoderShape(config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                        config.num_attention_heads)


# ------------------------------------------------------------------------------------------ the step
class DistillationStep:
    """prepare() a CPU micro-batch on the host; call with a list of prepared micro-batches for one optimizer
    step. `model` is the (possibly Accelerate-wrapped) DistillationModel; `teacher` a frozen Teacher on the
    same device; `optimizer`/`scheduler` as prepared by Accelerate."""

    def __init__(self, accelerator: Accelerator, model: nn.Module, teacher: Teacher, optimizer, scheduler=None,
                 *, clip_grad_norm: float = 5.0, teacher_autocast: bool | None = None):
        self.accelerator, self.model, self.teacher = accelerator, model, teacher
        # Whether the teacher's forward runs under the step's autocast. Default: not for a half-precision
        # teacher, which then runs in its own dtype end to end (autocast would keep its LayerNorm outputs and
        # residual stream in fp32: on an H100, 32x128 steps took 20 % longer, 128x512 ones 2 %).
        half_teacher = teacher.projector[0].dtype in (torch.float16, torch.bfloat16)
        self.teacher_autocast = not half_teacher if teacher_autocast is None else teacher_autocast
        self.optimizer_step = OptimizerStep(optimizer, scheduler, clip_grad_norm, accelerator=accelerator)
        inner: DistillationModel = accelerator.unwrap_model(model)
        self.loss_cfg, self.pairs, self.weights = inner.loss_cfg, inner.pairs, inner.weights
        self.device = accelerator.device
        self.pin = self.device.type == "cuda"
        self._upcoming: list[StepBatch] = []  # the next step's micro-batches, prepared during this one
        self._flops = dict(teacher=encoder_shape(teacher.config), student=encoder_shape(inner.student.config),
                           vocab=inner.student.config.vocab_size, loss_cfg=self.loss_cfg, pairs=self.pairs,
                           projected=[not isinstance(p, nn.Identity) for p in inner.projections])

    # -------------------------------------------------------------------- host side
    def prepare(self, batch: dict[str, torch.Tensor]) -> StepBatch:
        """A CPU batch (input_ids, attention_mask, labels: (B, T)) -> a StepBatch on the device. The copies
        are asynchronous (pinned memory) on GPUs."""
        layout = TokenLayout.from_mask(batch["attention_mask"])
        token_labels = layout.gather(batch["labels"])  # (N,)
        labelled = token_labels != -100
        if self.loss_cfg.restrict_ce_to_mask:
            scored = labelled.nonzero().squeeze(1)
            labels = token_labels.index_select(0, scored)
        else:
            scored, labels = None, token_labels
        lengths = (layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]).double()
        flops = step_flops(n_tokens=layout.n_tokens, sum_sq_len=float((lengths**2).sum()), n_rows=len(labels),
                           **self._flops)["total"]
        norms = torch.tensor([len(labels), float(labelled.sum()), layout.n_tokens, flops], dtype=torch.float32)
        tensors = [batch["input_ids"], batch["attention_mask"], labels, norms]
        if scored is not None:
            tensors.append(scored)
        if self.pin:
            tensors = [x.pin_memory() for x in tensors]
            layout = layout.pin_memory()
        moved = [x.to(self.device, non_blocking=True) for x in tensors]
        return StepBatch(input_ids=moved[0], attention_mask=moved[1], labels=moved[2], norms=moved[3],
                         scored=moved[4] if scored is not None else None,
                         layout=layout.to(self.device, non_blocking=True))

    def next_step(self, source: Iterator[dict[str, torch.Tensor]], grad_accum: int = 1, last: bool = False,
                  step: int = 0) -> StepResult:
        """One optimizer step on the next `grad_accum` CPU batches of `source`, as the trainer runs it: unless
        this is the `last` step, the following step's batches are collated and copied while the device works
        on this one (before the step's one read)."""
        micro = self._upcoming or [self.prepare(next(source)) for _ in range(grad_accum)]
        self._upcoming = []

        def prefetch() -> None:
            if not last:
                self._upcoming = [self.prepare(next(source)) for _ in range(grad_accum)]

        return self(micro, before_sync=prefetch, step=step)

    # -------------------------------------------------------------------- device side
    def __call__(self, micro: list[StepBatch], before_sync: Callable[[], Any] | None = None,
                 step: int = 0) -> StepResult:
        """Optimizer step number `step` over `micro` (gradient accumulation). `before_sync` runs after the last
        backward is enqueued and before the step's one read from the device (e.g. to prepare the next batches
        while the GPU works). Raises NonFiniteLoss, without updating, when the loss is not finite."""
        acc, model = self.accelerator, self.model
        world = acc.num_processes
        norms = torch.stack([b.norms for b in micro]).sum(0)
        if world > 1:
            norms = acc.reduce(norms, "sum")
        logged: dict[str, torch.Tensor] = {}
        for i, b in enumerate(micro):
            sync = i == len(micro) - 1
            with (contextlib.nullcontext() if sync else acc.no_sync(model)), acc.autocast():
                with torch.autocast(self.device.type, enabled=False) if not self.teacher_autocast else \
                        contextlib.nullcontext():
                    t = teacher_outputs(self.teacher, b, self.loss_cfg, self.pairs, self.weights)
                losses = model(b, t, norms)
                # Each process's loss is its share of a global mean; DDP averages gradients over
                # processes, so scale by their number to get the gradient of the global mean.
                acc.backward(losses["total"] * world)
            for k, v in losses.items():
                logged[k] = logged.get(k, 0) + v.detach().float()
        grad_norm = self.optimizer_step.clip(model.parameters())
        reduced = torch.stack(list(logged.values()))
        if world > 1:
            reduced = acc.reduce(reduced, "sum")
        if before_sync is not None:
            before_sync()
        numbers = torch.cat([reduced, torch.as_tensor(grad_norm, device=reduced.device).float().reshape(1),
                             norms]).tolist()  # the step's one host synchronisation
        values = dict(zip(logged, numbers[: len(logged)]))
        grad_norm, rows, mlm, tokens, flops = numbers[len(logged):]
        try:
            require_finite(values, step, "Try a lower train.lr, or train.mixed_precision=no.")
        except NonFiniteLoss:
            self.optimizer_step.discard()
            raise
        self.optimizer_step.apply()
        return StepResult(losses=values, grad_norm=grad_norm, rows=int(rows), mlm_tokens=int(mlm),
                          tokens=int(tokens), flops=flops)


def compile_blocks(modules: list[nn.Module], dynamic: bool | None = True) -> None:
    """torch.compile each transformer block in place (parameter names unchanged), as torchtitan does: one
    graph per kind of call (student with grad / teacher without, packed / padded rows), shared by all
    layers. dynamic=True (for padded documents): shapes are symbolic from the start, since every batch has
    another number of real tokens and recompiling per size would cost more than it gains; False (packed
    blocks, one shape): graphs specialised to that shape."""
    import torch._dynamo

    # student (fp32 weights) and teacher (its dtype) blocks, train / eval, grad / no-grad, packed / padded
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for m in modules:
        m.compile(dynamic=dynamic)
