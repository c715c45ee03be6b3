"""The distillation trainer: set-up (distill.build), then one loop that reads as what it does.

    for each step: distill.step.DistillationStep (teacher forward -> student forward -> losses -> backward,
    per micro-batch; clip -> AdamW step -> LR schedule) -> log -> maybe evaluate -> maybe checkpoint

Accelerate supplies the device, DDP/FSDP wrapping, mixed precision and trackers. Every process builds the
same global batches and takes its slice (distill.batching), and each loss is divided by normalisers summed
over all processes and micro-batches of the optimizer step, so one process and N processes with the same
global batch compute the same loss and gradients.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import transformers
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from distill import build, checkpoint, hub, rundir, tracking
from distill.batching import GlobalBatchSampler, StreamingBatches, eval_batches, streaming_loader, train_loader
from distill.corpus import Corpus, build_corpus, token_frequencies
from distill.flops import ThroughputMeter, peak_tflops
from distill.masking import MLMCollator, standard_masking
from distill.mechanics import NonFiniteLoss, adamw, make_accelerator, parameter_groups
from distill.metrics import MaskedLMScores, pack_correct, score_mlm
from distill.recipes import Recipe, RecipeError
from distill.step import DistillationModel, DistillationStep, StepResult, compile_blocks, layer_pairs
from students.tokenizer import get_tokenizer

logger = logging.getLogger(__name__)


def _warn_line(message: str) -> None:
    """One warning line that the progress bar does not overwrite."""
    tqdm.write(f"warning: {message}", file=sys.stderr)


# ------------------------------------------------------------------------------------------ components
class Evaluator:
    """Held-out masked-LM accuracy on fixed validation batches with standard masks (comparable across runs
    and with the teacher), on its own cadence: every `every` steps and at the last step, main process only.
    The last step's evaluation is also kept token by token in `heldout.json` (`write_heldout`), so runs
    evaluated on the same tokens can be compared paired (distill.downstream.measure)."""

    def __init__(self, accelerator, batches: list[list[dict]], collator: MLMCollator, metrics: tracking.MetricsFile,
                 every: int, last_step: int, heldout: Path):
        self.accelerator, self.batches, self.collator, self.metrics = accelerator, batches, collator, metrics
        self.every, self.last_step, self.heldout = every, last_step, heldout
        self.teacher: dict[str, float] = {}  # the baseline, measured once
        self.student: dict[str, float] = {}  # the latest evaluation
        self.teacher_scores: MaskedLMScores | None = None

    def evaluate(self, model) -> MaskedLMScores:
        return score_mlm(model, self.batches, self.collator, self.accelerator.device)

    def baseline(self, teacher, step: int, corpus: Corpus) -> None:
        if not self.accelerator.is_main_process:
            return
        self.teacher_scores = self.evaluate(teacher)
        self.teacher = self.teacher_scores.metrics()
        logger.info("teacher held-out MLM: %s", self.teacher)
        self.accelerator.log({f"teacher/{k}": v for k, v in self.teacher.items()}, step=step)
        tracking.log_config(self.accelerator, {"corpus": corpus.stats, "teacher_baseline": self.teacher})
        if step == 0:
            self.metrics.write({"step": step, "teacher": self.teacher, "corpus": corpus.stats})

    def maybe_evaluate(self, step: int, student) -> None:
        if step % self.every and step != self.last_step:
            return
        if self.accelerator.is_main_process:
            scores = self.evaluate(student)
            self.student = scores.metrics()
            record = {"step": step, **{f"eval/student_{k}": v for k, v in self.student.items()},
                      **{f"eval/teacher_{k}": v for k, v in self.teacher.items()}}
            self.accelerator.log(record, step=step)
            self.metrics.write(record)
            if step == self.last_step:
                write_heldout(self.heldout, step, scores, self.teacher_scores)
            tqdm.write(f"step {step}: student {self.student} teacher {self.teacher}", file=sys.stderr)
        self.accelerator.wait_for_everyone()


HELDOUT = "heldout.json"


def write_heldout(path: Path, step: int, student: MaskedLMScores, teacher: MaskedLMScores | None) -> None:
    """The last evaluation token by token (written atomically): the fingerprint of the scored tokens, and
    the student's and teacher's per-token correctness, packed (distill.metrics.pack_correct)."""
    models = {"student": student, **({"teacher": teacher} if teacher is not None else {})}
    record = {"step": step, "tokens": student.correct.numel(), "fingerprint": student.fingerprint,
              **{name: {**s.metrics(), "correct": pack_correct(s.correct)} for name, s in models.items()}}
    if teacher is not None and teacher.fingerprint != student.fingerprint:  # (cannot happen: same batches)
        raise RuntimeError("the teacher and the student were scored on different held-out tokens")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)


class Progress:
    """The progress bar and the training log (metrics.jsonl, trackers): every `every` steps and at the last,
    losses, learning rate, gradient norm, tokens/s, achieved TFLOP/s and MFU over the steps since the last
    record."""

    def __init__(self, accelerator, metrics: tracking.MetricsFile, scheduler, every: int, start: int, last_step: int,
                 peak: float | None):
        self.accelerator, self.metrics, self.scheduler = accelerator, metrics, scheduler
        self.every, self.last_step = every, last_step
        self.meter = ThroughputMeter(peak, accelerator.num_processes)
        self.bar = tqdm(total=last_step, initial=start, desc="distill", dynamic_ncols=True,
                        disable=not accelerator.is_main_process)

    def update(self, step: int, result: StepResult, seconds: float, tokens_so_far: int) -> None:
        self.meter.add(result.tokens, result.flops, seconds)
        self.bar.update(1)
        if step % self.every and step != self.last_step:
            return
        speed = self.meter.read()
        record = {"step": step, **{f"loss/{k}": v for k, v in result.losses.items()},
                  "lr": self.scheduler.get_last_lr()[0], "grad_norm": result.grad_norm, **speed,
                  "tokens": tokens_so_far}
        postfix = {"loss": f"{result.losses['total']:.3f}", "tok/s": f"{speed['tokens_per_s']:.0f}",
                   "TFLOP/s": f"{speed['tflops']:.3g}"}
        if "mfu" in speed:
            postfix["MFU"] = f"{100 * speed['mfu']:.1f}%"
        self.bar.set_postfix(postfix)
        self.accelerator.log(record, step=step)
        self.metrics.write(record)

    def close(self) -> None:
        self.bar.close()


# ------------------------------------------------------------------------------------------ entry points
def adapt_only(recipe: Recipe) -> dict[str, Any]:
    """Adapt (or reuse the cached adaptation of) the recipe's teacher without distilling; returns its
    adapt_report.json plus the adapted teacher's directory. `distill/run.py RECIPE --adapt-only`."""
    if recipe.teacher.adapt.steps == 0:
        raise RecipeError("teacher.adapt.steps is 0: nothing to adapt; set teacher.adapt.steps=N (e.g. 600)")
    build.check_distribution(None)
    accelerator = make_accelerator(recipe.train)
    build.check_distribution(accelerator)
    tokenizer = get_tokenizer(recipe.tokenizer)
    build.preflight(recipe, tokenizer, accelerator.num_processes)
    with accelerator.main_process_first():
        corpus = build_corpus(recipe.data, tokenizer)
    path = build.adapted_teacher(recipe, tokenizer, corpus, accelerator)
    return {"adapted_teacher": str(path), **json.loads((path / "adapt_report.json").read_text())}


def train(recipe: Recipe, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) a distillation; returns a summary. Writes under recipe.output_dir: recipe.yaml,
    metrics.jsonl, checkpoints/step-N/, student/ (Hugging Face format, with its tokenizer). A directory
    holding another run is refused unless `overwrite` (the CLI's --overwrite)."""
    run_dir = Path(recipe.output_dir)
    build.check_distribution(None)
    accelerator = make_accelerator(recipe.train, log_with=tracking.log_with(recipe.tracking),
                                   project_dir=str(run_dir))
    rundir.stop_with_launcher()
    build.check_distribution(accelerator)
    tokenizer = get_tokenizer(recipe.tokenizer)
    build.preflight(recipe, tokenizer, accelerator.num_processes)
    if run_dir.exists() and not run_dir.is_dir():
        raise rundir.RunDirError(f"output_dir {run_dir} is a file, not a directory; choose another output_dir")
    lock = rundir.lock_run(run_dir, accelerator)
    try:
        return _train(recipe, accelerator, tokenizer, overwrite)
    finally:
        lock.release()


# ------------------------------------------------------------------------------------------ the run
def _train(recipe: Recipe, accelerator, tokenizer, overwrite: bool) -> dict[str, Any]:
    train_cfg, loss_cfg = recipe.train, recipe.loss
    run_dir = Path(recipe.output_dir)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    set_seed(train_cfg.seed)

    # Resume, or start a new run (never silently over a finished one). The checkpoint is verified and read
    # now, and applied once the model exists.
    resuming = bool(checkpoint.checkpoint_dirs(run_dir) or checkpoint.legacy_dirs(run_dir)) and not overwrite
    saved = build.read_saved_recipe(run_dir) if not overwrite else None
    if saved is not None:
        build.check_resumable(saved, recipe)
    loaded = checkpoint.find(run_dir, rank, world, _warn_line, accelerator.wait_for_everyone) if resuming else None
    if loaded is None and accelerator.is_main_process:
        rundir.check_new_run(run_dir, overwrite)
    accelerator.wait_for_everyone()

    # Data, teacher, student, and the step that joins them.
    with accelerator.main_process_first():
        corpus = build_corpus(recipe.data, tokenizer)
    if accelerator.is_main_process and (saved is None or saved != recipe.to_dict()):
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml())  # (rewritten only when it changes)
    teacher = build.build_teacher(recipe, tokenizer, corpus, accelerator)
    student = build.build_student(recipe, teacher)
    pairs = layer_pairs(loss_cfg, student.config.n_layers, teacher.num_layers)
    kernel = build.loss_kernel(recipe, device)
    model = DistillationModel(student, teacher.config.hidden_size, loss_cfg, pairs, kernel,
                              teacher_heads=teacher.config.num_attention_heads)
    compiled = build.compile_enabled(recipe, device)
    if compiled:
        # packed blocks: one shape, graphs specialised to it (automatic dynamic if another appears); documents:
        # symbolic shapes from the start (every batch has another number of real tokens)
        compile_blocks([*student.distilbert.transformer.layer, *teacher.blocks],
                       dynamic=None if recipe.data.packing else True)
    optimizer = adamw(parameter_groups(model, train_cfg.weight_decay), train_cfg.lr, train_cfg.betas, train_cfg.eps,
                      fused=device.type in ("cpu", "cuda"))
    warmup = int(train_cfg.warmup_fraction * train_cfg.max_steps)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, warmup, train_cfg.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    distill_step = DistillationStep(accelerator, model, teacher, optimizer, scheduler,
                                    clip_grad_norm=train_cfg.clip_grad_norm)
    raw_student = accelerator.unwrap_model(model).student

    # The run's state: restored from the checkpoint, or new.
    parts = checkpoint.Parts(accelerator.unwrap_model(model), optimizer, scheduler, accelerator.scaler, rank, world,
                             accelerator.wait_for_everyone)
    state: dict[str, Any] = {"step": 0, "tokens": 0, "wandb_id": None}
    if loaded is not None:
        state = checkpoint.apply(loaded, parts)
        logger.info("resuming from %s (step %d)", loaded.path, state["step"])
        del loaded
    start = state["step"]
    metrics = tracking.MetricsFile(run_dir / "metrics.jsonl", accelerator.is_main_process)
    if accelerator.is_main_process:
        dropped = rundir.truncate_metrics(metrics.path, start if start > 0 else -1)
        if dropped:
            logger.info("metrics.jsonl: dropped %d records past step %d (they are recomputed)", dropped, start)
    state["wandb_id"] = tracking.start(accelerator, recipe.tracking, run_dir, recipe.to_dict(), state.get("wandb_id"))

    # The components that own their cadence, and the batches from where the run stands.
    frequencies = (token_frequencies(corpus.train, len(tokenizer), recipe.data.frequency_count_tokens)
                   if recipe.masking.smoothing else None)
    collator = MLMCollator(tokenizer, recipe.masking, frequencies)
    batches = _batches(recipe, corpus, collator, rank, world, first_batch=start * train_cfg.grad_accum,
                       pin=device.type == "cuda")
    validation = eval_batches(corpus.validation, max(1, train_cfg.batch_size // world), train_cfg.eval_batches,
                              train_cfg.eval_seed, train_cfg.eval_mask_draws)
    evaluator = Evaluator(accelerator, validation, MLMCollator(tokenizer, standard_masking(recipe.masking)), metrics,
                          train_cfg.eval_every, train_cfg.max_steps, run_dir / HELDOUT)
    evaluator.baseline(teacher, start, corpus)
    checkpointer = checkpoint.Checkpointer(parts, run_dir, train_cfg.save_every, train_cfg.max_steps,
                                           train_cfg.keep_checkpoints)
    peak = peak_tflops(device, train_cfg.mixed_precision, train_cfg.peak_tflops)
    logger.info("step: vocabulary-loss kernel %s, compiled blocks %s, peak %s TFLOP/s per device", kernel,
                compiled, peak)
    progress = Progress(accelerator, metrics, scheduler, train_cfg.log_every, start, train_cfg.max_steps, peak)
    stop = rundir.StopRequest()
    step = start
    try:
        while step < train_cfg.max_steps:
            # one optimizer step; a non-finite loss stops the run before the update
            model.train()
            t0 = time.perf_counter()
            try:
                result = distill_step.next_step(batches, train_cfg.grad_accum, last=step + 1 == train_cfg.max_steps,
                                                step=step + 1)
            except NonFiniteLoss as e:
                raise NonFiniteLoss(f"{e} Last good checkpoint: {checkpoint.latest(run_dir) or 'none yet'}.",
                                    e.values) from None
            step += 1
            state["tokens"] += result.tokens
            progress.update(step, result, time.perf_counter() - t0, state["tokens"])
            evaluator.maybe_evaluate(step, raw_student)
            # a signal on any process stops every process after a checkpoint at this step
            stop_now = stop.agreed(accelerator)
            checkpointer.maybe_save(step, state, force=stop_now)
            if stop_now:
                signum = stop.signum or signal.SIGTERM
                logger.warning("signal %d: checkpoint saved at step %d; exiting", signum, step)
                raise SystemExit(128 + signum)
        progress.close()
        export = _export(recipe, accelerator, raw_student, tokenizer, corpus, evaluator, state, step)
    finally:
        progress.close()
        stop.restore()
        if hasattr(batches, "close"):
            batches.close()
        accelerator.end_training()  # also tears down the process group
    return {"step": step, "student": evaluator.student, "teacher": evaluator.teacher, "export": str(export),
            "corpus": corpus.stats}


def _batches(recipe: Recipe, corpus: Corpus, collator: MLMCollator, rank: int, world: int, first_batch: int,
             pin: bool):
    """This process's training batches from global micro-batch `first_batch` on (those before it were
    consumed by the steps already taken)."""
    train_cfg = recipe.train
    if recipe.data.streaming:
        # The stream is tokenized on the fly, in a background thread (no forks follow): let the fast
        # tokenizer use every core, or tokenizing becomes the step's bottleneck on GPUs.
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        stream = StreamingBatches(corpus.train, train_cfg.batch_size, train_cfg.seed, recipe.data.shuffle_buffer)
        return streaming_loader(stream, collator, rank, world, first_batch, prefetch=2 * train_cfg.grad_accum,
                                pin_memory=pin)
    sampler = GlobalBatchSampler(corpus.train["length"], train_cfg.batch_size, train_cfg.seed,
                                 group_by_length=not recipe.data.packing)
    return iter(train_loader(corpus.train, sampler, collator, rank, world, first_batch, train_cfg.num_workers,
                             train_cfg.seed, pin_memory=pin))


def _export(recipe: Recipe, accelerator, student, tokenizer, corpus: Corpus, evaluator: Evaluator,
            state: dict[str, Any], step: int) -> Path:
    """student/ (Hugging Face directory with tokenizer and model card), optionally pushed to the Hub and
    logged as a wandb artifact; the run's summary in the trackers."""
    run_dir = Path(recipe.output_dir)
    export = run_dir / "student"
    if accelerator.is_main_process:
        hub.save_model(student, tokenizer, export)
        card = hub.distilled_card(recipe, student, recipe.teacher.name_or_path, corpus.stats, step, state["tokens"],
                                  evaluator.student, evaluator.teacher)
        hub.write_card(export, card)
        hub.push(export, recipe.hub, f"distilled student, step {step}")
        summary = {"student": evaluator.student, "teacher": evaluator.teacher, "step": step}
        tracking.log_summary(accelerator, {**summary, "tokens": state["tokens"]})
        tracking.log_model(accelerator, recipe.tracking, export, f"{run_dir.name}-student", summary)
    accelerator.wait_for_everyone()
    return export
