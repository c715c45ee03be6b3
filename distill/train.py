"""The distillation trainer: set-up, then one loop that reads top to bottom.

    distill.step.DistillationStep (teacher forward -> student forward -> losses -> backward, per
    micro-batch; clip -> AdamW step -> LR schedule) -> log (tokens/s, TFLOP/s, MFU) / evaluate / checkpoint

Accelerate supplies the device, DDP/FSDP/DeepSpeed wrapping, mixed precision and trackers. Every process
builds the same global batches and takes its slice (distill.data), and each loss is divided by counts
summed over all processes and micro-batches of the optimizer step, so one process and N processes with
the same global batch compute the same loss and gradients.
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

import torch
import transformers
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import DistilBertConfig

from distill import checkpoint, hub, rundir, tracking
from distill.data import (
    GlobalBatchSampler,
    StreamingBatches,
    build_corpus,
    check_files,
    corpus_identity,
    eval_batches,
    streaming_loader,
    token_counts,
    train_loader,
)
from distill.flops import ThroughputMeter, peak_tflops
from distill.masking import MLMCollator, standard_masking
from distill.metrics import evaluate_mlm
from distill.recipes import Recipe, RecipeError
from distill.step import DistillationModel, DistillationStep, NonFiniteLoss, compile_blocks, layer_pairs
from students.config import config_from_teacher, create_model_config
from students.init import default_layers, init_from_teacher
from students.modeling import DistilBERTForMaskedLM
from students.tokenizer import get_tokenizer
from teachers.adapt import adapt_teacher
from teachers.teacher import Teacher, TeacherError, has_mlm_head, resolve_teacher_path, teacher_config

logger = logging.getLogger(__name__)

# Keys that may change between a run and its resumption (they do not change the computation).
RESUMABLE_CHANGES = ("train.max_steps", "teacher.adapt.save_every",
                     "train.log_every", "train.eval_every", "train.save_every",
                     "train.keep_checkpoints", "train.num_workers", "train.eval_batches", "train.eval_mask_draws",
                     "tracking.",
                     "train.compile", "train.loss_kernel", "train.peak_tflops",
                     "train.compile_loss",  # (recorded by runs of earlier versions)
                     "output_dir",  # a moved or copied run directory resumes
                     "hub.")


# ------------------------------------------------------------------------------------------ set-up
def loss_kernel(recipe: Recipe, device: torch.device) -> str:
    """The vocabulary losses' kernel: the recipe's, or for `auto` Triton on CUDA and eager PyTorch elsewhere."""
    kernel = recipe.train.loss_kernel
    other = recipe.loss.divergence != "forward_kl" and recipe.loss.alpha_ce > 0
    if kernel == "auto":
        # the Triton kernel computes the forward KL; other divergences run as torch.compile'd PyTorch on CUDA
        kernel = ("compiled" if other else "triton") if device.type == "cuda" else "eager"
    if kernel == "triton" and other:
        raise RecipeError(f"train.loss_kernel=triton computes the forward KL only; loss.divergence="
                          f"{recipe.loss.divergence} needs train.loss_kernel auto, eager or compiled")
    if kernel == "triton":
        if device.type != "cuda":
            raise RecipeError("train.loss_kernel=triton needs a CUDA device; use auto or eager")
        try:
            import triton  # noqa: F401
        except ImportError as e:
            raise RecipeError("train.loss_kernel=triton needs the triton package (pip install triton), or set "
                              "train.loss_kernel=eager") from e
    return kernel


def compile_enabled(recipe: Recipe, device: torch.device) -> bool:
    return device.type == "cuda" if recipe.train.compile == "auto" else bool(recipe.train.compile)


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
    if accelerator.is_main_process:
        # runs/<run>/teacher: the exact teacher used (e.g. the cached adaptation), for fine-tuning and reports.
        rundir.link_teacher(Path(recipe.output_dir), resolve_teacher_path(source))
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


def make_accelerator(section, **kwargs) -> Accelerator:
    """An Accelerator with the recipe's precision when it sets one (one line when the launcher asked for
    another), else Accelerate's own (launch flag, config file, environment). `section.mixed_precision` is
    set to what the run actually uses, so the run directory's recipe.yaml records it."""
    wanted = section.mixed_precision
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if wanted is not None and launched not in (None, "no", wanted):
        logger.warning("train.mixed_precision=%s (the recipe) overrides Accelerate's %s", wanted, launched)
    accelerator = Accelerator(mixed_precision=wanted, **kwargs)
    used = accelerator.mixed_precision
    if used not in ("no", "bf16", "fp16"):
        raise RecipeError(f"mixed precision {used!r} from Accelerate is not supported; use no, bf16 or fp16")
    section.mixed_precision = used
    return accelerator


def check_precision(mixed_precision: str, device: torch.device) -> None:
    """Refuse a precision the device would silently not use (Accelerate runs fp16-on-CPU as fp32)."""
    if mixed_precision == "fp16" and device.type == "cpu":
        raise RecipeError("train.mixed_precision=fp16 is not supported on CPUs (it would silently run in fp32); "
                          "use bf16 or no")
    if mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RecipeError(f"train.mixed_precision=bf16 is not supported by {torch.cuda.get_device_name(device)}; "
                          "use fp16 or no")


def asked_for(name: str) -> bool:
    """Whether `accelerate launch` (flag or config file) asked for FSDP / DEEPSPEED."""
    return os.environ.get(f"ACCELERATE_USE_{name}", "false").lower() == "true"


def check_distribution(accelerator: Accelerator | None) -> None:
    """Refuse a sharding the user asked for that would not happen, or whose state the checkpoints cannot
    hold. Called before the Accelerator exists (None) and after."""
    from accelerate.utils import DistributedType

    if asked_for("DEEPSPEED") or accelerator and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise RecipeError("DeepSpeed is not supported: its ZeRO optimizer state can only be stored with pickle, which "
                          "the kit's checkpoints never hold; shard with FSDP instead (recipes/accelerate/fsdp.yaml)")
    if accelerator and asked_for("FSDP") and accelerator.distributed_type != DistributedType.FSDP:
        raise RecipeError(f"FSDP was asked for, but Accelerate runs this as {accelerator.distributed_type.value} "
                          "(it applies FSDP on GPUs only); drop --use_fsdp, or launch on GPUs")


def preflight(recipe: Recipe, tokenizer, device: torch.device, world: int) -> None:
    """Every check that needs no corpus and no weights, before any slow work (tokenizing, adapting,
    loading): precision, the teacher's config and files, vocabulary, positions, student shape."""
    cfg, scfg = recipe.train, recipe.student
    check_precision(cfg.mixed_precision, device)
    check_files(recipe.data)
    hub.check_push(recipe.hub)
    if cfg.batch_size % world:
        raise RecipeError(f"train.batch_size={cfg.batch_size} must be a multiple of the {world} processes")
    tconf = teacher_config(recipe.teacher.name_or_path)
    if len(tokenizer) != tconf.vocab_size:
        raise TeacherError(f"vocabulary mismatch: teacher {recipe.teacher.name_or_path} has {tconf.vocab_size} "
                           f"tokens, tokenizer {recipe.tokenizer} {len(tokenizer)}; use the teacher's tokenizer")
    positions = tconf.max_position_embeddings
    if recipe.data.max_length > positions:
        raise RecipeError(f"data.max_length={recipe.data.max_length} exceeds the teacher's {positions} position "
                          f"embeddings; set data.max_length<={positions}")
    if recipe.teacher.adapt.steps == 0 and has_mlm_head(recipe.teacher.name_or_path) is False:
        raise TeacherError(f"teacher {recipe.teacher.name_or_path} has no trained MLM head; adapt it first "
                           "(recipe: teacher.adapt.steps > 0)")
    depth = tconf.num_hidden_layers
    sconf = student_config(recipe, tconf)
    n = sconf.n_layers
    if scfg.init == "teacher":
        if n > depth:
            raise RecipeError(f"student.n_layers={n} is deeper than the teacher ({depth} layers); student.init="
                              f"teacher copies teacher layers: use student.n_layers<={depth}")
        bad = [i for i in scfg.layers or [] if not 0 <= i < depth]
        if bad:
            raise RecipeError(f"student.layers {bad} are not teacher layers (0..{depth - 1})")
        if scfg.layers is not None and len(scfg.layers) != n:
            raise RecipeError(f"student.layers lists {len(scfg.layers)} layers for a {n}-layer student")
    loss = recipe.loss
    layer_pairs(loss, n, depth)  # raises on layer_map pairs or a relation layer out of range
    heads = loss.relation_heads or tconf.num_attention_heads
    if loss.alpha_relation and (tconf.hidden_size % heads or sconf.dim % heads):
        raise RecipeError(f"loss.relation_heads={heads} must divide both widths (teacher {tconf.hidden_size}, "
                          f"student {sconf.dim})")
    if loss.alpha_value_relation and sconf.n_heads != tconf.num_attention_heads:
        raise RecipeError(f"loss.alpha_value_relation (MiniLM v1) needs equal head counts (student "
                          f"{sconf.n_heads}, teacher {tconf.num_attention_heads}); use loss.alpha_relation")


def student_config(recipe: Recipe, tconf):
    """The student's config as `build_student` will make it, read without weights (for `preflight`): a
    preset (checked against the teacher), a checkpoint directory's config, or one derived from the teacher."""
    scfg, data = recipe.student, recipe.data
    if scfg.init not in ("teacher", "random"):
        path = Path(scfg.init)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"student.init {scfg.init!r}: use 'teacher', 'random' or a checkpoint directory "
                                    "with a config.json")
        return DistilBertConfig.from_pretrained(path)
    if not scfg.preset:
        return config_from_teacher(tconf, n_layers=scfg.n_layers)
    try:
        pconf = create_model_config(scfg.preset)
    except ValueError as e:
        raise RecipeError(f"student.preset: {e}") from None
    if pconf.vocab_size != tconf.vocab_size:
        raise RecipeError(f"student.preset {scfg.preset!r} has {pconf.vocab_size} tokens, the teacher "
                          f"{tconf.vocab_size}")
    if scfg.init == "teacher" and (pconf.dim, pconf.n_heads, pconf.hidden_dim) != (
            tconf.hidden_size, tconf.num_attention_heads, tconf.intermediate_size):
        raise RecipeError(f"student.preset {scfg.preset!r} ({pconf.dim} wide, {pconf.n_heads} heads) cannot be "
                          f"initialised from the teacher ({tconf.hidden_size} wide, {tconf.num_attention_heads} "
                          "heads); use student.init=random or no preset")
    if pconf.max_position_embeddings < data.max_length:
        raise RecipeError(f"data.max_length={data.max_length} exceeds student.preset's "
                          f"{pconf.max_position_embeddings} positions")
    if scfg.n_layers:
        pconf.n_layers = scfg.n_layers
    return pconf


def check_resumable(saved: dict, recipe: Recipe) -> None:
    """A run directory is resumed only by the same recipe (up to keys that do not change the math)."""
    a, b = tracking.flatten(saved, "."), tracking.flatten(recipe.to_dict(), ".")
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_CHANGES)]
    if changed:
        raise RecipeError(f"{recipe.output_dir} holds a run with a different recipe ({', '.join(changed[:3])} "
                          "differ); use another output_dir, or pass --overwrite to replace that run")
    old = a.get("train.max_steps")
    if old is not None and old != recipe.train.max_steps:
        cfg = recipe.train
        logger.warning("train.max_steps changed from %s to %s on resume: the learning-rate schedule changes from "
                       "here on (warmup %d steps, linear decay to 0 at step %d)", old, cfg.max_steps,
                       int(cfg.warmup_fraction * cfg.max_steps), cfg.max_steps)


def read_saved_recipe(run_dir: Path) -> dict | None:
    path = run_dir / "recipe.yaml"
    if not path.exists():
        return None
    try:
        saved = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path} is not a readable recipe ({type(e).__name__}); use another output_dir, or "
                          "pass --overwrite to replace that run") from None
    if not isinstance(saved, dict):
        raise RecipeError(f"{path} is not a recipe mapping; use another output_dir, or pass --overwrite")
    return saved


def _warn_line(message: str) -> None:
    """One warning line that the progress bar does not overwrite."""
    tqdm.write(f"warning: {message}", file=sys.stderr)


def adapt_only(recipe: Recipe) -> dict[str, Any]:
    """Adapt (or reuse the cached adaptation of) the recipe's teacher without distilling; returns its
    adapt_report.json plus the adapted teacher's directory. `distill/run.py RECIPE --adapt-only`."""
    if recipe.teacher.adapt.steps == 0:
        raise RecipeError("teacher.adapt.steps is 0: nothing to adapt; set teacher.adapt.steps=N (e.g. 600)")
    check_distribution(None)
    accelerator = make_accelerator(recipe.train)
    check_distribution(accelerator)
    share_cpu_cores(accelerator)
    tokenizer = get_tokenizer(recipe.tokenizer)
    preflight(recipe, tokenizer, accelerator.device, accelerator.num_processes)
    with accelerator.main_process_first():
        corpus = build_corpus(recipe.data, tokenizer)
    path = adapted_teacher(recipe, tokenizer, corpus, accelerator)
    return {"adapted_teacher": str(path), **json.loads((path / "adapt_report.json").read_text())}


# ------------------------------------------------------------------------------------------ the run
def train(recipe: Recipe, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) a distillation; returns a summary. Writes under recipe.output_dir: recipe.yaml,
    metrics.jsonl, checkpoints/step-N/, student/ (Hugging Face format, with its tokenizer). A directory
    holding another run is refused unless `overwrite` (the CLI's --overwrite)."""
    run_dir = Path(recipe.output_dir)
    check_distribution(None)
    accelerator = make_accelerator(recipe.train, log_with=tracking.log_with(recipe.tracking),
                                   project_dir=str(run_dir))
    rundir.stop_with_launcher()
    check_distribution(accelerator)
    share_cpu_cores(accelerator)
    tokenizer = get_tokenizer(recipe.tokenizer)
    preflight(recipe, tokenizer, accelerator.device, accelerator.num_processes)
    if run_dir.exists() and not run_dir.is_dir():
        raise rundir.RunDirError(f"output_dir {run_dir} is a file, not a directory; choose another output_dir")
    lock = rundir.RunLock(run_dir)
    error = None
    if accelerator.is_main_process:
        try:
            lock.acquire()
        except rundir.RunDirError as e:
            error = str(e)
    error = broadcast_object_list([error])[0] if accelerator.num_processes > 1 else error
    if error:
        raise rundir.RunDirError(error)
    try:
        return _train(recipe, accelerator, tokenizer, overwrite)
    finally:
        lock.release()


def _train(recipe: Recipe, accelerator: Accelerator, tokenizer, overwrite: bool) -> dict[str, Any]:
    cfg, loss_cfg = recipe.train, recipe.loss
    run_dir = Path(recipe.output_dir)
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(cfg.seed)

    # --- resume, or start a new run (never silently over a finished one)
    resuming = bool(checkpoint.checkpoint_dirs(run_dir) or checkpoint.legacy_dirs(run_dir)) and not overwrite
    saved = read_saved_recipe(run_dir) if not overwrite else None
    if saved is not None:
        check_resumable(saved, recipe)
    # the checkpoint to resume from: verified and read now, applied once the model exists
    loaded = checkpoint.find(run_dir, rank, world, _warn_line, accelerator.wait_for_everyone) if resuming else None
    if loaded is None and accelerator.is_main_process:
        rundir.check_new_run(run_dir, overwrite)
    accelerator.wait_for_everyone()

    # --- data, teacher, student
    with accelerator.main_process_first():
        corpus = build_corpus(recipe.data, tokenizer)
    if accelerator.is_main_process and (saved is None or saved != recipe.to_dict()):
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml())  # (rewritten only when it changes)
    teacher = build_teacher(recipe, tokenizer, corpus, accelerator)
    student = build_student(recipe, teacher)
    pairs = layer_pairs(loss_cfg, student.config.n_layers, teacher.num_layers)
    kernel = loss_kernel(recipe, accelerator.device)
    model = DistillationModel(student, teacher.config.hidden_size, loss_cfg, pairs, kernel,
                              teacher_heads=teacher.config.num_attention_heads)
    compiled = compile_enabled(recipe, accelerator.device)
    if compiled:
        # packed blocks: one shape, graphs specialised to it (automatic dynamic if another appears); documents:
        # symbolic shapes from the start (every batch has another number of real tokens)
        compile_blocks([*student.distilbert.transformer.layer, *teacher.blocks],
                       dynamic=None if recipe.data.packing else True)
    frequencies = (token_counts(corpus.train, len(tokenizer), recipe.data.frequency_count_tokens)
                   if recipe.masking.smoothing else None)
    collator = MLMCollator(tokenizer, recipe.masking, frequencies)
    eval_collator = MLMCollator(tokenizer, standard_masking(recipe.masking))  # comparable held-out accuracy
    val = eval_batches(corpus.validation, max(1, cfg.batch_size // world), cfg.eval_batches, cfg.seed,
                       cfg.eval_mask_draws)

    optimizer = torch.optim.AdamW(optimizer_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                                  eps=cfg.eps, fused=accelerator.device.type in ("cpu", "cuda"))
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_fraction * cfg.max_steps),
                                                             cfg.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    distill_step = DistillationStep(accelerator, model, teacher, optimizer, scheduler,
                                    clip_grad_norm=cfg.clip_grad_norm)
    parts = checkpoint.Parts(accelerator.unwrap_model(model), optimizer, scheduler, accelerator.scaler, rank, world,
                             accelerator.wait_for_everyone)

    state: dict[str, Any] = {"step": 0, "tokens": 0, "wandb_id": None}
    if loaded is not None:
        state = checkpoint.apply(loaded, parts)
        logger.info("resuming from %s (step %d)", loaded.path, state["step"])
        del loaded
    start_step = state["step"]
    metrics = tracking.MetricsFile(run_dir / "metrics.jsonl", accelerator.is_main_process)
    if accelerator.is_main_process:
        dropped = rundir.truncate_metrics(metrics.path, start_step if start_step > 0 else -1)
        if dropped:
            logger.info("metrics.jsonl: dropped %d records past step %d (they are recomputed)", dropped, start_step)
    state["wandb_id"] = tracking.start(accelerator, recipe.tracking, run_dir, recipe.to_dict(), state.get("wandb_id"))

    first_batch = start_step * cfg.grad_accum  # global micro-batches already consumed
    pin = accelerator.device.type == "cuda"
    if recipe.data.streaming:
        # The stream is tokenized on the fly, in a background thread (no forks follow): let the fast
        # tokenizer use every core, or tokenizing becomes the step's bottleneck on GPUs.
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        batches = streaming_loader(StreamingBatches(corpus.train, cfg.batch_size, cfg.seed, recipe.data.shuffle_buffer),
                                   collator, rank, world, first_batch, prefetch=2 * cfg.grad_accum, pin_memory=pin)
    else:
        sampler = GlobalBatchSampler(corpus.train["length"], cfg.batch_size, cfg.seed,
                                     group_by_length=not recipe.data.packing)
        batches = iter(train_loader(corpus.train, sampler, collator, rank, world, first_batch, cfg.num_workers,
                                    cfg.seed, pin_memory=pin))

    raw_student = accelerator.unwrap_model(model).student
    teacher_eval = None
    if accelerator.is_main_process:
        teacher_eval = evaluate_mlm(teacher.predict_tokens, lambda i, m: teacher(i, m).last_hidden_state, val,
                                    eval_collator, accelerator.device)
        logger.info("teacher held-out MLM: %s", teacher_eval)
        accelerator.log({f"teacher/{k}": v for k, v in teacher_eval.items()}, step=start_step)  # the baseline
        tracking.log_config(accelerator, {"corpus": corpus.stats, "teacher_baseline": teacher_eval})
        if start_step == 0:
            metrics.write({"step": start_step, "teacher": teacher_eval, "corpus": corpus.stats})

    peak = peak_tflops(accelerator.device, cfg.mixed_precision, cfg.peak_tflops)
    meter = ThroughputMeter(peak, world)
    logger.info("step: vocabulary-loss kernel %s, compiled blocks %s, peak %s TFLOP/s per device", kernel,
                compiled, peak)

    stop = rundir.StopRequest()
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="distill", disable=not accelerator.is_main_process,
               dynamic_ncols=True)
    student_eval: dict[str, float] = {}
    step = start_step
    try:
        while step < cfg.max_steps:
            model.train()
            t0 = time.perf_counter()
            try:
                result = distill_step.next_step(batches, cfg.grad_accum, last=step + 1 == cfg.max_steps)
            except NonFiniteLoss as e:
                good = checkpoint.latest(run_dir)
                raise FloatingPointError(f"non-finite loss at step {step + 1} ({e.values}); stopped without "
                                         f"updating. Last good checkpoint: {good or 'none yet'}. Try a lower "
                                         "train.lr or mixed_precision: no") from None
            values = result.losses
            step += 1
            state["tokens"] += result.tokens
            meter.add(result.tokens, result.flops, time.perf_counter() - t0)
            bar.update(1)

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                speed = meter.read()
                record = {"step": step, **{f"loss/{k}": v for k, v in values.items()},
                          "lr": scheduler.get_last_lr()[0], "grad_norm": result.grad_norm, **speed,
                          "tokens": state["tokens"]}
                postfix = {"loss": f"{values['total']:.3f}", "tok/s": f"{speed['tokens_per_s']:.0f}",
                           "TFLOP/s": f"{speed['tflops']:.3g}"}
                if "mfu" in speed:
                    postfix["MFU"] = f"{100 * speed['mfu']:.1f}%"
                bar.set_postfix(postfix)
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
                    bar.write(f"step {step}: student {student_eval} teacher {teacher_eval}", file=sys.stderr)
                accelerator.wait_for_everyone()
            stop_now = accelerator.reduce(torch.tensor(float(stop.signum > 0), device=accelerator.device), "sum") > 0
            if step % cfg.save_every == 0 or step == cfg.max_steps or stop_now:
                state["step"] = step
                checkpoint.save(parts, run_dir, step, state, cfg.keep_checkpoints)
            if stop_now:
                signum = stop.signum or signal.SIGTERM
                logger.warning("signal %d: checkpoint saved at step %d; exiting", signum, step)
                raise SystemExit(128 + signum)
        bar.close()
        export = run_dir / "student"
        if accelerator.is_main_process:
            hub.save_model(raw_student, tokenizer, export)
            card = hub.distilled_card(recipe, raw_student, recipe.teacher.name_or_path, corpus.stats, step,
                                      state["tokens"], student_eval, teacher_eval)
            hub.write_card(export, card)
            hub.push(export, recipe.hub, f"distilled student, step {step}")
            tracking.log_summary(accelerator, {"student": student_eval, "teacher": teacher_eval, "step": step,
                                               "tokens": state["tokens"]})
            tracking.log_model(accelerator, recipe.tracking, export, f"{run_dir.name}-student",
                               {"student": student_eval, "teacher": teacher_eval, "step": step})
        accelerator.wait_for_everyone()
    finally:
        bar.close()
        stop.restore()
        if hasattr(batches, "close"):
            batches.close()
        accelerator.end_training()  # also tears down the process group
    return {"step": step, "student": student_eval, "teacher": teacher_eval, "export": str(export),
            "corpus": corpus.stats}
