"""Teacher adaptation, a training job: continued MLM training of a BERT teacher on the distillation corpus.

Needed for teachers without an MLM head (sentence encoders such as the offline all-MiniLM-L6-v2), and
useful for any teacher (adapt bert-base to your domain, then distil). All layers train; the loss is taken
on the masked positions only, so the vocabulary projection runs on ~15% of the rows. The result is
cached on disk under a key of everything that determines it, so later runs reuse it.

An adaptation in progress checkpoints into `<cache entry>.partial/` every `save_every` steps and on
SIGTERM/SIGINT (the checkpoints of distill.checkpoint: no pickle, verified, with fallback), holding a lock
there; an interrupted adaptation resumes where it stopped, with the same result as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from tqdm.auto import tqdm
from transformers import BertForMaskedLM, PreTrainedTokenizerBase

from distill import checkpoint, rundir
from distill.batching import GlobalBatchSampler, eval_batches, train_loader
from distill.corpus import Corpus
from distill.masking import MLMCollator, standard_masking
from distill.mechanics import OptimizerStep, adamw, atomic_directory, parameter_groups, require_finite
from distill.metrics import evaluate_mlm
from distill.recipes import AdaptConfig, MaskingConfig
from teachers.teacher import load_bert_mlm, resolve_teacher_path

logger = logging.getLogger(__name__)

ADAPT_VERSION = "1"
NOT_IN_KEY = ("save_every",)  # settings that do not change the adapted weights
LOCK_POLL_S = 10.0  # how often a run waiting for another's adaptation of the same teacher looks again
# Settings added after version 1: in the key only when changed from their defaults, so the adaptations
# cached before they existed (which used those defaults) stay valid.
KEY_WHEN_CHANGED = ("betas", "eps", "clip_grad_norm")


def cache_root() -> Path:
    """Where adapted teachers live: $DISTILBERT_KIT_CACHE, else ~/.cache/distilbert_kit."""
    return Path(os.environ.get("DISTILBERT_KIT_CACHE", Path.home() / ".cache" / "distilbert_kit"))


def source_identity(name_or_path: str) -> dict:
    """What identifies the starting teacher: a hub name, or the content of a directory's weight and config
    files (name + SHA-256). Content, not size and mtime, so a reinstalled or moved copy of the same teacher
    keeps its cached adaptation; a changed byte does not."""
    path = Path(resolve_teacher_path(name_or_path))
    if not path.is_dir():
        return {"hub": name_or_path}
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    return {"files": [(p.name, checkpoint.file_sha256(p)) for p in files]}


def adaptation_key(name_or_path: str, cfg: AdaptConfig, masking: MaskingConfig, corpus_id: dict) -> str:
    defaults = dataclasses.asdict(AdaptConfig())
    settings = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k not in NOT_IN_KEY and not (k in KEY_WHEN_CHANGED and v == defaults[k])}
    payload = {
        "version": ADAPT_VERSION,
        "teacher": source_identity(name_or_path),
        "adapt": settings,
        "masking": dataclasses.asdict(masking),
        "corpus": corpus_id,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def adapt_teacher(name_or_path: str, tokenizer: PreTrainedTokenizerBase, corpus: Corpus, corpus_id: dict,
                  cfg: AdaptConfig, masking: MaskingConfig, device: torch.device | str = "cpu",
                  root: Path | None = None) -> Path:
    """Adapt (or reuse the cached adaptation of) a teacher; returns the adapted model's directory,
    which holds the model, its tokenizer and adapt_report.json."""
    masking = standard_masking(masking)
    key = adaptation_key(name_or_path, cfg, masking, corpus_id)
    out = (root or cache_root()) / "teachers" / f"{Path(name_or_path).name}-adapted-{key}"
    if (out / "adapt_report.json").exists():
        logger.info("reusing adapted teacher %s", out)
        return out
    partial = out.with_name(out.name + ".partial")
    lock = rundir.RunLock(partial)
    # One adaptation of this teacher at a time: a run started beside one that is adapting it (two ablations
    # in parallel) waits for it and then reuses its result; a dead one's lock is taken over and resumed.
    lock.acquire(wait_s=LOCK_POLL_S)
    if (out / "adapt_report.json").exists():  # finished by the adaptation just waited for
        lock.release()
        shutil.rmtree(partial, ignore_errors=True)  # what is left of it (the lock's directory) is not needed
        logger.info("reusing adapted teacher %s", out)
        return out
    stop = rundir.StopRequest()
    # The caller's generators are left as they were: a run that adapts and one that reuses the cached
    # adaptation go on identically.
    caller_rng = checkpoint.rng_files()
    try:
        model, report = _adapt(name_or_path, tokenizer, corpus, cfg, masking, torch.device(device), partial, stop)
        report["key"] = key
        logger.info("teacher adapted in %.0f s: held-out masked accuracy %.3f -> %.3f",
                    report["seconds"], report["before"]["mlm_accuracy"], report["after"]["mlm_accuracy"])
        with atomic_directory(out) as tmp:  # a half-written adaptation is never picked up
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "adapt_report.json").write_text(json.dumps(report, indent=2))
    finally:
        checkpoint.set_rng(*caller_rng)
        stop.restore()
        lock.release()
    if (out / "adapt_report.json").exists():
        shutil.rmtree(partial, ignore_errors=True)  # its checkpoints are no longer needed
    return out


def _adapt(name_or_path: str, tokenizer, corpus: Corpus, cfg: AdaptConfig, masking: MaskingConfig,
           device: torch.device, partial: Path, stop: rundir.StopRequest) -> tuple[BertForMaskedLM, dict]:
    """The adaptation loop, resumed from `partial`'s newest usable checkpoint when there is one."""
    torch.manual_seed(cfg.seed)  # the new head's initialisation and dropout: the same result on every machine
    with _quiet_transformers():
        model, missing = load_bert_mlm(name_or_path)
    model.to(device).train()
    collator = MLMCollator(tokenizer, masking)
    val = eval_batches(corpus.validation, cfg.batch_size, cfg.eval_batches, cfg.seed)

    # the (new) MLM head learns at head_lr; its decoder is tied to the word embeddings and trains with the body
    groups = parameter_groups(model, cfg.weight_decay, head="cls.", head_lr=cfg.head_lr)
    optimizer = adamw(groups, cfg.lr, cfg.betas, cfg.eps)
    warmup = max(1, int(cfg.warmup_fraction * cfg.steps))
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, warmup, cfg.steps)
    optimizer_step = OptimizerStep(optimizer, scheduler, cfg.clip_grad_norm)
    parts = checkpoint.Parts(model, optimizer, scheduler)

    loaded = checkpoint.find(partial, warn=lambda m: tqdm.write(f"warning: {m}"))
    if loaded is not None:
        state = checkpoint.apply(loaded, parts)
        logger.info("resuming the adaptation of %s at step %d of %d", name_or_path, state["step"], cfg.steps)
    else:
        state = {"step": 0, "seconds": 0.0, "before": evaluate_mlm(model, val, collator, device)}
        logger.info("teacher %s before adaptation: %s (new head tensors: %s)", name_or_path, state["before"],
                    missing)
    sampler = GlobalBatchSampler(corpus.train["length"], cfg.batch_size, cfg.seed, group_by_length=True)
    batches = iter(train_loader(corpus.train, sampler, collator, rank=0, world=1, start_batch=state["step"],
                                seed=cfg.seed))
    t0 = time.perf_counter() - state["seconds"]
    bar = tqdm(range(state["step"], cfg.steps), desc="adapt teacher", dynamic_ncols=True)
    for step in bar:
        b = {k: v.to(device) for k, v in next(batches).items()}
        hidden = model.bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        rows = b["labels"] != -100
        loss = F.cross_entropy(model.cls(hidden[rows]).float(), b["labels"][rows])
        require_finite(loss.item(), step + 1, "The teacher adaptation diverged; lower teacher.adapt.lr")
        loss.backward()
        optimizer_step(model.parameters())
        bar.set_postfix(loss=f"{loss.item():.3f}")
        done = step + 1
        if stop.signum or (done % cfg.save_every == 0 and done < cfg.steps):
            state.update(step=done, seconds=time.perf_counter() - t0)
            checkpoint.save(parts, partial, done, state, keep=2)
        if stop.signum:
            bar.close()
            logger.warning("signal %d: adaptation checkpoint saved at step %d of %d in %s; run again to resume",
                           stop.signum, done, cfg.steps, partial)
            raise SystemExit(128 + stop.signum)
    seconds = time.perf_counter() - t0
    after = evaluate_mlm(model, val, collator, device)
    report = {"teacher": name_or_path, "steps": cfg.steps, "batch_size": cfg.batch_size, "seconds": round(seconds, 1),
              "before": state["before"], "after": after, "new_head_tensors": missing}
    return model, report


class _quiet_transformers:
    """Silence transformers' load report while loading a headless checkpoint on purpose."""

    def __enter__(self):
        self.level = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()

    def __exit__(self, *exc):
        transformers.logging.set_verbosity(self.level)
