"""Fine-tuning (and optional task-specific distillation) of sequence classifiers, through Accelerate.

    accelerate launch distill/run.py recipes/finetune/wiki-topics.yaml model=runs/wiki/student

Works for our DistilBERT exports and any transformers sequence-classification checkpoint (the BERT
teacher too, for the comparison). Evaluates on validation every epoch (or `eval_every` steps), stops
early after `patience` evaluations without improvement, exports the best model with `save_pretrained`
and reports its test metrics in results.json. With `distill.teacher` set, the loss is the paper's second
step: a_task * CE(labels) + a_ce * T^2 * KL(teacher/T || student/T).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from distill import hub, rundir, tracking
from distill.downstream.tasks import load_classification, split_loader
from distill.losses import soft_target_loss
from distill.mechanics import (
    OptimizerStep,
    adamw,
    atomic_directory,
    make_accelerator,
    parameter_groups,
    require_finite,
)
from distill.metrics import compute_classification_loss, evaluate_classification_metrics
from distill.recipes import FinetuneRecipe
from students.modeling import DistilBERTForSequenceClassification, resolve_model_dir
from students.tokenizer import get_tokenizer

logger = logging.getLogger(__name__)


def load_classifier(name_or_path: str, label_names: list[str]) -> torch.nn.Module:
    """Our DistilBERT for DistilBERT checkpoints, transformers' Auto class for anything else (BERT)."""
    directory = resolve_model_dir(name_or_path)
    config = transformers.AutoConfig.from_pretrained(directory)
    labels = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
              "label2id": {n: i for i, n in enumerate(label_names)}}
    if config.model_type == "distilbert":
        return DistilBERTForSequenceClassification.from_pretrained(directory, **labels)
    return transformers.AutoModelForSequenceClassification.from_pretrained(directory, **labels)


def check_task_teacher(recipe: FinetuneRecipe, model_dir: Path, model_config, tokenizer) -> Path | None:
    """The task-distillation teacher (`distill.teacher`), checked before any slow work: a fine-tuned sequence
    classifier (a teacher with an untrained head would give random soft targets) that reads the student's
    token ids (same vocabulary) at `task.max_length`. Its labels are checked against the task's once the
    data is loaded (`check_teacher_labels`). None without a teacher."""
    if not recipe.distill.teacher:
        return None
    try:
        directory = resolve_model_dir(recipe.distill.teacher)
        config = transformers.AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as e:
        raise ValueError(f"distill.teacher {recipe.distill.teacher} cannot be read: {str(e).strip().splitlines()[0]}"
                         ) from None
    if Path(directory).resolve() == Path(model_dir).resolve():
        raise ValueError(f"distill.teacher {recipe.distill.teacher} is the model being fine-tuned; give the fine-tuned "
                         "teacher's directory")
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(f"distill.teacher {recipe.distill.teacher} is not a fine-tuned classifier (its config names "
                         f"{architectures or 'no architecture'}); fine-tune the teacher on this task first "
                         "(distill/run.py <finetune recipe> model=<teacher> output_dir=<dir>) and pass that directory")
    student_vocab = model_config.vocab_size
    if config.vocab_size != student_vocab:
        raise ValueError(f"distill.teacher {recipe.distill.teacher} has a vocabulary of {config.vocab_size} tokens, "
                         f"the model {student_vocab}: the teacher must read the student's token ids")
    if any((Path(directory) / f).is_file() for f in ("tokenizer.json", "vocab.txt")):
        if get_tokenizer(str(directory)).get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"distill.teacher {recipe.distill.teacher} has another tokenizer vocabulary than the "
                             "model's (same size, other ids): the teacher must read the student's token ids")
    check_positions(config, recipe.task.max_length, f"distill.teacher {recipe.distill.teacher}")
    return Path(directory)


def check_positions(config, max_length: int, what: str) -> None:
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and max_length > positions:
        raise ValueError(f"task.max_length {max_length} exceeds the {positions} position embeddings of {what}; "
                         f"set task.max_length <= {positions}")


def check_teacher_labels(teacher_dir: Path, label_names: list[str]) -> None:
    """The teacher's classifier must predict this task's labels, in this order."""
    config = transformers.AutoConfig.from_pretrained(teacher_dir)
    theirs, ours = [str(config.id2label[i]) for i in range(config.num_labels)], [str(n) for n in label_names]
    if theirs != ours:
        def show(names):
            return ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")

        raise ValueError(f"distill.teacher {teacher_dir} was fine-tuned on other labels ({len(theirs)}: "
                         f"{show(theirs)}) than the task's ({len(ours)}: {show(ours)}); fine-tune it on this task")


def finetune(recipe: FinetuneRecipe, overwrite: bool = False) -> dict[str, Any]:
    """Fine-tune `recipe.model` on `recipe.task`; writes recipe.yaml, metrics.jsonl, results.json and the
    best model (a transformers directory with its tokenizer) into recipe.output_dir, and returns the test
    accuracy / macro-F1 of the best model. Every input is checked before anything is written; a directory
    holding a finished fine-tune is refused unless `overwrite` (the CLI's --overwrite)."""
    run_dir = Path(recipe.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise rundir.RunDirError(f"output_dir {run_dir} is a file, not a directory; choose another output_dir")
    hub.check_push(recipe.hub)
    model_dir = resolve_model_dir(recipe.model)
    tokenizer = get_tokenizer(recipe.tokenizer or str(model_dir))
    model_config = transformers.AutoConfig.from_pretrained(model_dir)
    check_positions(model_config, recipe.task.max_length, f"model {recipe.model}")
    teacher_dir = check_task_teacher(recipe, model_dir, model_config, tokenizer)
    accelerator = make_accelerator(recipe.train, log_with=tracking.log_with(recipe.tracking), project_dir=str(run_dir))
    rundir.stop_with_launcher()
    sources = {"model": model_dir, **({"distill.teacher": teacher_dir} if teacher_dir else {})}
    lock = rundir.lock_run(run_dir, accelerator)
    try:
        earlier = rundir.check_new_finetune(run_dir, overwrite, recipe.to_dict(), sources)
        return _finetune(recipe, accelerator, tokenizer, teacher_dir, earlier)
    finally:
        lock.release()


def _finetune(recipe: FinetuneRecipe, accelerator, tokenizer, teacher_dir: Path | None,
              earlier: list[Path]) -> dict[str, Any]:
    train_cfg = recipe.train
    run_dir = Path(recipe.output_dir)
    set_seed(train_cfg.seed)
    data = load_classification(recipe.task, seed=train_cfg.seed)
    logger.info("task %s: %s", recipe.task.source, data.stats)
    if teacher_dir is not None:
        check_teacher_labels(teacher_dir, data.label_names)
    if accelerator.is_main_process:
        rundir.remove(earlier, run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    accelerator.wait_for_everyone()
    model = load_classifier(recipe.model, data.label_names)
    teacher = None
    if teacher_dir is not None:
        teacher = load_classifier(str(teacher_dir), data.label_names).eval().requires_grad_(False)
        teacher.to(accelerator.device)
    max_len = recipe.task.max_length
    splits, batch, eval_batch = data.splits, train_cfg.batch_size, train_cfg.eval_batch_size
    train_dl = split_loader(splits["train"], tokenizer, batch, max_len, shuffle=True, seed=train_cfg.seed)
    val_dl = split_loader(splits["validation"], tokenizer, eval_batch, max_len, shuffle=False)
    test_dl = split_loader(splits["test"], tokenizer, eval_batch, max_len, shuffle=False)
    steps = len(train_dl) * train_cfg.epochs
    if train_cfg.max_steps is not None:
        steps = min(train_cfg.max_steps, steps)
    optimizer = adamw(parameter_groups(model, train_cfg.weight_decay), train_cfg.lr)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, int(train_cfg.warmup_fraction * steps), steps)
    model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    optimizer_step = OptimizerStep(optimizer, scheduler, train_cfg.clip_grad_norm, accelerator=accelerator)
    tracking.start(accelerator, recipe.tracking, run_dir, recipe.to_dict(), None,
                   group=tracking.group_of(recipe.tracking, run_dir, recipe.model), job_type="finetune")
    metrics_file = tracking.MetricsFile(run_dir / "metrics.jsonl", accelerator.is_main_process)
    eval_every = train_cfg.eval_every or len(train_dl)
    raw = accelerator.unwrap_model(model)

    best, best_step, bad_evals, history = -math.inf, 0, 0, []
    best_dir = run_dir / ".best"  # the best model so far; moved into run_dir at the end
    step, t0, stop = 0, time.perf_counter(), False
    bar = tqdm(total=steps, desc="finetune", disable=not accelerator.is_main_process, dynamic_ncols=True)
    for epoch in range(train_cfg.epochs):
        for batch in train_dl:
            model.train()
            with accelerator.autocast():
                logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = task_loss = compute_classification_loss(logits, batch["labels"])
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    d = recipe.distill
                    kd_loss = soft_target_loss(logits, t_logits, d.temperature)
                    loss = d.alpha_task * task_loss + d.alpha_ce * kd_loss
            require_finite(loss.item(), step + 1, f"Best model so far: {best_dir}; try a lower train.lr")
            accelerator.backward(loss)
            optimizer_step(model.parameters())
            step += 1
            bar.update(1)
            if step % train_cfg.log_every == 0:
                record = {"step": step, "epoch": epoch, "loss/train": loss.item(), "lr": scheduler.get_last_lr()[0]}
                if teacher is not None:  # the two terms, unweighted
                    record |= {"loss/task": task_loss.item(), "loss/kd": kd_loss.item()}
                accelerator.log(record, step=step)
                metrics_file.write(record)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % eval_every == 0 or step == steps:
                val = evaluate_classification_metrics(raw, val_dl, len(data.label_names))
                record = {"step": step, "epoch": epoch, "eval/accuracy": val["accuracy"],
                          "eval/macro_f1": val["macro_f1"], "eval/loss": val["loss"]}
                history.append(record)
                accelerator.log(record, step=step)
                metrics_file.write(record)
                bar.write(f"step {step}: validation accuracy {val['accuracy']:.4f} macro-F1 {val['macro_f1']:.4f}",
                          file=sys.stderr)
                if val[train_cfg.metric] > best:
                    best, best_step, bad_evals = val[train_cfg.metric], step, 0
                    if accelerator.is_main_process:
                        with atomic_directory(best_dir) as tmp:
                            hub.save_model(raw, tokenizer, tmp)
                else:
                    bad_evals += 1
                    stop = bad_evals >= train_cfg.patience
                accelerator.wait_for_everyone()
            if stop or step >= steps:
                break
        if stop or step >= steps:
            break
    bar.close()
    train_seconds = time.perf_counter() - t0

    best_model = load_classifier(str(best_dir), data.label_names).to(accelerator.device)
    test = evaluate_classification_metrics(best_model, test_dl, len(data.label_names))
    val = evaluate_classification_metrics(best_model, val_dl, len(data.label_names))
    results = {"model": recipe.model, "task": recipe.task.source, "label_names": data.label_names,
               "best_step": best_step, "steps": step, "early_stopped": stop, "train_seconds": round(train_seconds, 1),
               "validation": val, "test": test, "data": data.stats, "history": history,
               "task_distillation_teacher": recipe.distill.teacher}
    accelerator.log({"test/accuracy": test["accuracy"], "test/macro_f1": test["macro_f1"], "test/loss": test["loss"]},
                    step=step)
    if tracking.run_of(accelerator) is not None:
        from distill.downstream.render import plot_confusion

        figure = run_dir / plot_confusion(results, "test", run_dir, "test")
        tracking.log_classification(accelerator, data.label_names, test, "test", figure)
    tracking.log_summary(accelerator, {"test": {k: test[k] for k in ("accuracy", "macro_f1", "loss")},
                                       "validation": {k: val[k] for k in ("accuracy", "macro_f1", "loss")},
                                       "best_step": best_step})
    if accelerator.is_main_process:
        publish(best_dir, run_dir)
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
        hub.write_card(run_dir, hub.finetuned_card(recipe, data.label_names, results))
        hub.push(run_dir, recipe.hub, f"fine-tuned on {recipe.task.source}, test accuracy {test['accuracy']:.4f}")
    tracking.log_model(accelerator, recipe.tracking, run_dir, f"{run_dir.name}-classifier",
                       {"test": {"accuracy": test["accuracy"], "macro_f1": test["macro_f1"]}})
    accelerator.end_training()
    return {"test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"], "best_step": best_step,
            "export": str(run_dir)}


def publish(best_dir: Path, run_dir: Path) -> None:
    """Move the best model's files into the run directory (each file replaced atomically), so
    `from_pretrained(output_dir)` loads it; the working copy goes."""
    for f in sorted(best_dir.iterdir()):
        os.replace(f, run_dir / f.name)
    best_dir.rmdir()
