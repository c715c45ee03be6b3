"""The distillation trainer: set-up, then one loop that reads top to bottom.

    teacher forward (inference mode) -> student forward -> combined loss -> backward
    -> (after grad_accum micro-batches) clip -> AdamW step -> LR schedule -> log / evaluate / checkpoint

Accelerate supplies the device, DDP/FSDP/DeepSpeed wrapping, mixed precision and trackers. Every process
builds the same global batches and takes its slice (distill.data), and each loss is divided by counts
summed over all processes and micro-batches of the optimizer step, so one process and N processes with
the same global batch compute the same loss and gradients.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm

from distill import checkpoint, tracking
from distill.data import (
    GlobalBatchSampler,
    StreamingBatches,
    build_corpus,
    corpus_identity,
    eval_batches,
    streaming_loader,
    token_counts,
    train_loader,
)
from distill.losses import VocabLossWeights, attention_kl_loss, cosine_loss, fused_vocab_losses, hidden_mse_loss
from distill.masking import MLMCollator, standard_masking
from distill.metrics import evaluate_mlm
from distill.recipes import LossConfig, Recipe, RecipeError
from students.config import config_from_teacher, create_model_config
from students.init import default_layers, init_from_teacher
from students.modeling import DistilBERTForMaskedLM
from students.tokenizer import get_tokenizer
from teachers.adapt import adapt_teacher
from teachers.teacher import Teacher

logger = logging.getLogger(__name__)

# Keys that may change between a run and its resumption (they do not change the computation).
RESUMABLE_CHANGES = ("train.max_steps", "train.log_every", "train.eval_every", "train.save_every",
                     "train.keep_checkpoints", "train.num_workers", "train.eval_batches", "tracking.")


# ------------------------------------------------------------------------------------------ the model
def layer_pairs(cfg: LossConfig, n_student: int, n_teacher: int) -> dict[str, list[tuple[int, int]]]:
    """(student, teacher) hidden-state indices (0 = embeddings) for each intermediate loss."""
    if cfg.layer_map is not None:
        pairs = [tuple(p) for p in cfg.layer_map]
        bad = [p for p in pairs if not (0 <= p[0] <= n_student and 0 <= p[1] <= n_teacher)]
        if bad:
            raise RecipeError(f"loss.layer_map pairs {bad} out of range "
                              f"(student 0..{n_student}, teacher 0..{n_teacher})")
        return {"cos": pairs, "hidden": pairs, "attn": [p for p in pairs if p[0] > 0 and p[1] > 0]}
    uniform = [(i, round(i * n_teacher / n_student)) for i in range(n_student + 1)]
    return {"cos": [(n_student, n_teacher)], "hidden": uniform, "attn": uniform[1:]}


class DistillationModel(nn.Module):
    """What trains: the student, plus projections for hidden-state MSE between different widths.

    `forward` runs the student and returns every loss; it is the module Accelerate wraps, so all the
    student's parameters are used inside the wrapped forward (as DDP and FSDP require).
    """

    def __init__(self, student: DistilBERTForMaskedLM, teacher_dim: int, cfg: LossConfig,
                 pairs: dict[str, list[tuple[int, int]]], compile_loss: bool = False):
        super().__init__()
        self.student, self.cfg, self.pairs = student, cfg, pairs
        dim = student.config.dim
        self.projections = nn.ModuleList(
            [nn.Linear(dim, teacher_dim) if dim != teacher_dim else nn.Identity() for _ in pairs["hidden"]]
        ) if cfg.alpha_hidden_mse else nn.ModuleList()
        self.weights = VocabLossWeights(cfg.alpha_ce, cfg.alpha_mlm, cfg.alpha_mse, cfg.temperature, compile_loss)

    def forward(self, batch: dict[str, torch.Tensor], rows: torch.Tensor, t: dict[str, Any],
                counts: dict[str, float]) -> dict[str, torch.Tensor]:
        """batch: input_ids/attention_mask/labels (B, T); rows: (B, T) bool, the positions scored by the
        vocabulary losses; t: teacher tensors; counts: global normalisers for this optimizer step."""
        cfg = self.cfg
        out = self.student.distilbert(batch["input_ids"], batch["attention_mask"], output_hidden_states=True,
                                      output_attentions=cfg.alpha_attn > 0)
        real = batch["attention_mask"].bool()
        h_rows = self.student.transform(out.hidden_states[-1][rows])  # (N, C)
        proj = self.student.vocab_projector
        total, ce, mlm, mse = fused_vocab_losses(h_rows, proj.weight, proj.bias, t["rows"], t["W"], t["b"],
                                                 batch["labels"][rows], self.weights, counts["rows"], counts["mlm"])
        losses = {"ce": ce, "mlm": mlm, "mse": mse}
        if cfg.alpha_cos:
            cos = sum(cosine_loss(out.hidden_states[i], t["hidden"][j], real, counts["tokens"])
                      for i, j in self.pairs["cos"]) / len(self.pairs["cos"])
            total = total + cfg.alpha_cos * cos
            losses["cos"] = cos.detach()
        if cfg.alpha_hidden_mse:
            hid = sum(hidden_mse_loss(p(out.hidden_states[i]), t["hidden"][j], real, counts["tokens"])
                      for p, (i, j) in zip(self.projections, self.pairs["hidden"])) / len(self.pairs["hidden"])
            total = total + cfg.alpha_hidden_mse * hid
            losses["hidden_mse"] = hid.detach()
        if cfg.alpha_attn:
            att = sum(attention_kl_loss(out.attentions[i - 1], t["attentions"][j - 1], real, counts["tokens"])
                      for i, j in self.pairs["attn"]) / len(self.pairs["attn"])
            total = total + cfg.alpha_attn * att
            losses["attn"] = att.detach()
        losses["total"] = total
        return losses


def teacher_tensors(teacher: Teacher, batch: dict[str, torch.Tensor], rows: torch.Tensor, cfg: LossConfig,
                    pairs: dict[str, list[tuple[int, int]]]) -> dict[str, Any]:
    """Teacher hidden states, attentions and transformed rows for one micro-batch (inference mode).

    Only the hidden layers some loss uses are kept, cloned out of inference mode so autograd may save
    them; the vocabulary projection is left to the fused loss (never B x T x V teacher logits)."""
    out = teacher(batch["input_ids"], batch["attention_mask"], output_attentions=cfg.alpha_attn > 0)
    used = {j for key in ("cos", "hidden") for _, j in pairs[key]} if (cfg.alpha_cos or cfg.alpha_hidden_mse) else set()
    with torch.inference_mode():
        t_rows = teacher.transform(out.hidden_states[-1][rows])  # (N, Ct)
    W, b = teacher.projector
    return {
        "rows": t_rows.clone(),
        "W": W,
        "b": b,
        "hidden": {j: out.hidden_states[j].clone() for j in used},
        "attentions": [a.clone() for a in out.attentions] if cfg.alpha_attn else None,
    }


def scored_rows(batch: dict[str, torch.Tensor], restrict_to_mask: bool) -> torch.Tensor:
    """(B, T) bool: the rows the vocabulary losses score — masked tokens, or every real token."""
    return batch["labels"] != -100 if restrict_to_mask else batch["attention_mask"].bool()


# ------------------------------------------------------------------------------------------ set-up
def share_cpu_cores(accelerator: Accelerator) -> None:
    """`accelerate launch` sets OMP_NUM_THREADS=1; on CPU give each process its share of the cores."""
    if accelerator.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // accelerator.num_processes))


def adapted_teacher(recipe: Recipe, tokenizer, corpus, accelerator: Accelerator) -> Path:
    """The recipe's teacher after `teacher.adapt` (adapted once on the main process, then cached)."""
    with accelerator.main_process_first():
        return adapt_teacher(recipe.teacher.name_or_path, tokenizer, corpus, corpus_identity(recipe.data, tokenizer),
                             recipe.teacher.adapt, recipe.masking, device=accelerator.device)


def build_teacher(recipe: Recipe, tokenizer, corpus, accelerator: Accelerator) -> Teacher:
    """Load the teacher; adapt it first (once, cached) when the recipe asks for it."""
    tcfg = recipe.teacher
    attn = "eager" if recipe.loss.alpha_attn else "sdpa"
    source = str(adapted_teacher(recipe, tokenizer, corpus, accelerator)) if tcfg.adapt.steps > 0 else tcfg.name_or_path
    teacher = Teacher.load(source, dtype=tcfg.dtype, attn_implementation=attn)
    teacher.check_tokenizer(tokenizer)
    link = Path(recipe.output_dir) / "teacher"
    if accelerator.is_main_process and Path(source).is_dir() and not link.exists():
        # runs/<run>/teacher: the exact teacher used (e.g. the cached adaptation), for fine-tuning and reports.
        link.symlink_to(Path(source).resolve(), target_is_directory=True)
    return teacher.to(accelerator.device)


def build_student(recipe: Recipe, teacher: Teacher) -> DistilBERTForMaskedLM:
    """The student the recipe asks for, with its dropout setting applied."""
    student = _initial_student(recipe, teacher)
    if recipe.student.dropout is not None:
        student.config.dropout = student.config.attention_dropout = recipe.student.dropout
        for m in student.modules():
            if isinstance(m, nn.Dropout):
                m.p = recipe.student.dropout
    return student


def _initial_student(recipe: Recipe, teacher: Teacher) -> DistilBERTForMaskedLM:
    scfg = recipe.student
    if scfg.init == "teacher":
        config = create_model_config(scfg.preset) if scfg.preset else None  # checked against the teacher
        if config is not None and scfg.n_layers:
            config.n_layers = scfg.n_layers
        n = config.n_layers if config is not None else scfg.n_layers or max(1, teacher.num_layers // 2)
        return init_from_teacher(teacher, scfg.layers or default_layers(teacher.num_layers, n), config=config)
    if scfg.init == "random":
        config = (create_model_config(scfg.preset) if scfg.preset
                  else config_from_teacher(teacher.config, n_layers=scfg.n_layers))
        if scfg.preset and scfg.n_layers:
            config.n_layers = scfg.n_layers
        return DistilBERTForMaskedLM(config)
    if not Path(scfg.init).is_dir():
        raise FileNotFoundError(f"student.init {scfg.init!r}: use 'teacher', 'random' or a checkpoint directory")
    return DistilBERTForMaskedLM.from_pretrained(scfg.init)


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and LayerNorm weights (the reference's grouping)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def check_resumable(saved: dict, recipe: Recipe) -> None:
    """A run directory is resumed only by the same recipe (up to keys that do not change the math)."""
    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    a, b = dict(flat(saved)), dict(flat(recipe.to_dict()))
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_CHANGES)]
    if changed:
        raise RecipeError(f"{recipe.output_dir} holds a run with a different recipe ({', '.join(changed[:3])} "
                          "differ); use another output_dir, or delete the old run to start over")


class StopRequest:
    """SIGTERM/SIGINT: finish the current step, save a checkpoint, exit."""

    def __init__(self):
        self.signum = 0
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.signum = signum

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


def adapt_only(recipe: Recipe) -> dict[str, Any]:
    """Adapt (or reuse the cached adaptation of) the recipe's teacher without distilling; returns its
    adapt_report.json plus the adapted teacher's directory. `distill/run.py RECIPE --adapt-only`."""
    if recipe.teacher.adapt.steps == 0:
        raise RecipeError("teacher.adapt.steps is 0: nothing to adapt; set teacher.adapt.steps=N (e.g. 600)")
    accelerator = Accelerator(mixed_precision=recipe.train.mixed_precision)
    share_cpu_cores(accelerator)
    tokenizer = get_tokenizer(recipe.tokenizer)
    with accelerator.main_process_first():
        corpus = build_corpus(recipe.data, tokenizer)
    path = adapted_teacher(recipe, tokenizer, corpus, accelerator)
    return {"adapted_teacher": str(path), **json.loads((path / "adapt_report.json").read_text())}


# ------------------------------------------------------------------------------------------ the run
def train(recipe: Recipe) -> dict[str, Any]:
    """Run (or resume) a distillation; returns a summary. Writes under recipe.output_dir: recipe.yaml,
    metrics.jsonl, checkpoints/step-N/, student/ (Hugging Face format, with its tokenizer)."""
    cfg, tcfg = recipe.train, recipe.loss
    run_dir = Path(recipe.output_dir)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with=tracking.log_with(recipe.tracking),
                              project_dir=str(run_dir))
    share_cpu_cores(accelerator)
    rank, world = accelerator.process_index, accelerator.num_processes
    if cfg.batch_size % world:
        raise RecipeError(f"train.batch_size={cfg.batch_size} must be a multiple of the {world} processes")
    set_seed(cfg.seed)

    # --- resume or start
    last = checkpoint.latest(run_dir)
    saved_recipe = run_dir / "recipe.yaml"
    if last is not None and saved_recipe.exists():
        check_resumable(yaml.safe_load(saved_recipe.read_text()), recipe)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        saved_recipe.write_text(recipe.to_yaml())

    # --- data, teacher, student
    tokenizer = get_tokenizer(recipe.tokenizer)
    with accelerator.main_process_first():
        corpus = build_corpus(recipe.data, tokenizer)
    teacher = build_teacher(recipe, tokenizer, corpus, accelerator)
    student = build_student(recipe, teacher)
    pairs = layer_pairs(tcfg, student.config.n_layers, teacher.num_layers)
    model = DistillationModel(student, teacher.config.hidden_size, tcfg, pairs, cfg.compile_loss)
    counts = (token_counts(corpus.train, len(tokenizer), recipe.data.frequency_count_tokens)
              if recipe.masking.smoothing else None)
    collator = MLMCollator(tokenizer, recipe.masking, counts)
    eval_collator = MLMCollator(tokenizer, standard_masking(recipe.masking))  # comparable held-out accuracy
    val = eval_batches(corpus.validation, max(1, cfg.batch_size // world), cfg.eval_batches, cfg.seed)

    optimizer = torch.optim.AdamW(optimizer_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                                  eps=cfg.eps, fused=accelerator.device.type in ("cpu", "cuda"))
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_fraction * cfg.max_steps),
                                                             cfg.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    state: dict[str, Any] = {"step": 0, "tokens": 0, "wandb_id": None}
    if last is not None:
        state = checkpoint.load(accelerator, last)
        logger.info("resuming from %s (step %d)", last, state["step"])
    start_step = state["step"]
    state["wandb_id"] = tracking.start(accelerator, recipe.tracking, run_dir, recipe.to_dict(), state.get("wandb_id"))
    metrics = tracking.MetricsFile(run_dir / "metrics.jsonl", accelerator.is_main_process)

    first_batch = start_step * cfg.grad_accum  # global micro-batches already consumed
    if recipe.data.streaming:
        batches = streaming_loader(StreamingBatches(corpus.train, cfg.batch_size, cfg.seed, recipe.data.shuffle_buffer),
                                   collator, rank, world, first_batch)
    else:
        sampler = GlobalBatchSampler(corpus.train["length"], cfg.batch_size, cfg.seed,
                                     group_by_length=not recipe.data.packing)
        batches = iter(train_loader(corpus.train, sampler, collator, rank, world, first_batch, cfg.num_workers,
                                    cfg.seed))

    raw_student = accelerator.unwrap_model(model).student
    teacher_eval = None
    if accelerator.is_main_process:
        teacher_eval = evaluate_mlm(teacher.predict_tokens, lambda i, m: teacher(i, m).last_hidden_state, val,
                                    eval_collator, accelerator.device)
        logger.info("teacher held-out MLM: %s", teacher_eval)
        metrics.write({"step": start_step, "teacher": teacher_eval, "corpus": corpus.stats})

    stop = StopRequest()
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="distill", disable=not accelerator.is_main_process,
               dynamic_ncols=True)
    t_last, tokens_since = time.perf_counter(), 0
    student_eval: dict[str, float] = {}
    step = start_step
    try:
        while step < cfg.max_steps:
            model.train()
            micro = [{k: v.to(accelerator.device) for k, v in next(batches).items()} for _ in range(cfg.grad_accum)]
            rows = [scored_rows(b, tcfg.restrict_ce_to_mask) for b in micro]
            local = torch.stack([torch.stack([r.sum(), (b["labels"] != -100).sum(), b["attention_mask"].sum()])
                                 for r, b in zip(rows, micro)]).sum(0).float()
            n_rows, n_mlm, n_tokens = accelerator.reduce(local, "sum").tolist()
            norm = {"rows": n_rows, "mlm": n_mlm, "tokens": n_tokens}
            logged: dict[str, torch.Tensor] = {}
            for i, (b, r) in enumerate(zip(micro, rows)):
                sync = i == cfg.grad_accum - 1
                with (contextlib.nullcontext() if sync else accelerator.no_sync(model)), accelerator.autocast():
                    t = teacher_tensors(teacher, b, r, tcfg, pairs)
                    losses = model(b, r, t, norm)
                    # Each process's loss is its share of a global mean; DDP averages gradients over
                    # processes, so scale by their number to get the gradient of the global mean.
                    accelerator.backward(losses["total"] * world)
                for k, v in losses.items():
                    logged[k] = logged.get(k, 0) + v.detach().float()
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
            reduced = accelerator.reduce(torch.stack(list(logged.values())), "sum")
            values = dict(zip(logged, reduced.tolist()))
            if not math.isfinite(values["total"]):
                good = checkpoint.latest(run_dir)
                raise FloatingPointError(f"non-finite loss at step {step + 1} ({values}); stopped without updating. "
                                         f"Last good checkpoint: {good or 'none yet'}. Try a lower train.lr or "
                                         "mixed_precision: no")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            state["tokens"] += int(n_tokens)
            tokens_since += int(n_tokens)
            bar.update(1)

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                now = time.perf_counter()
                tps = tokens_since / max(now - t_last, 1e-9)
                t_last, tokens_since = now, 0
                record = {"step": step, **{f"loss/{k}": v for k, v in values.items()},
                          "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "tokens_per_s": tps,
                          "tokens": state["tokens"]}
                bar.set_postfix(loss=f"{values['total']:.3f}", tok_s=f"{tps:.0f}")
                accelerator.log(record, step=step)
                metrics.write(record)
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                if accelerator.is_main_process:
                    raw_student.eval()
                    student_eval = evaluate_mlm(raw_student.predict_tokens,
                                                lambda i, m: raw_student.distilbert(i, m).last_hidden_state, val,
                                                eval_collator, accelerator.device)
                    record = {"step": step, **{f"eval/student_{k}": v for k, v in student_eval.items()},
                              **{f"eval/teacher_{k}": v for k, v in teacher_eval.items()}}
                    accelerator.log(record, step=step)
                    metrics.write(record)
                    bar.write(f"step {step}: student {student_eval} teacher {teacher_eval}")
                accelerator.wait_for_everyone()
            stop_now = accelerator.reduce(torch.tensor(float(stop.signum > 0), device=accelerator.device), "sum") > 0
            if step % cfg.save_every == 0 or step == cfg.max_steps or stop_now:
                state["step"] = step
                checkpoint.save(accelerator, run_dir, step, state, cfg.keep_checkpoints)
            if stop_now:
                signum = stop.signum or signal.SIGTERM
                logger.warning("signal %d: checkpoint saved at step %d; exiting", signum, step)
                raise SystemExit(128 + signum)
        bar.close()
        export = run_dir / "student"
        if accelerator.is_main_process:
            raw_student.save_pretrained(export)
            tokenizer.save_pretrained(export)
        accelerator.wait_for_everyone()
    finally:
        bar.close()
        stop.restore()
        accelerator.end_training()  # also tears down the process group
    return {"step": step, "student": student_eval, "teacher": teacher_eval, "export": str(export),
            "corpus": corpus.stats}
