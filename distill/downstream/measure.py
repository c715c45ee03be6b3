"""What the report measures: the models (parameters, size on disk, encoder latency, held-out masked-LM
accuracy on a distillation run's validation blocks), the fine-tuning runs' results, and the ablation
variants' metrics with 95 % intervals (distill.stats)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distill import stats


# ------------------------------------------------------------------------------------------ models
@dataclass
class Encoder:
    """A masked-LM directory loaded for measuring: `model` follows distill.metrics.MaskedLM (encode,
    predict_tokens); `module` holds its parameters."""

    directory: Path
    model: Any
    module: torch.nn.Module

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    @property
    def disk_mb(self) -> float:
        return sum(p.stat().st_size for p in self.directory.glob("*.safetensors")) / 2**20


def load_encoder(directory: Path) -> Encoder:
    """Our DistilBERT for DistilBERT directories; a `teachers.Teacher` (BERT run through the kit's DistilBERT
    implementation, layer by layer) for anything else, so latencies compare architectures, not code."""
    from transformers import AutoConfig

    from students.modeling import DistilBERTForMaskedLM
    from teachers.teacher import Teacher

    if AutoConfig.from_pretrained(directory).model_type == "distilbert":
        m = DistilBERTForMaskedLM.from_pretrained(directory).eval()
        return Encoder(directory, m, m)
    t = Teacher.load(str(directory))
    return Encoder(directory, t, t.model)


def held_out_mlm(distill_run: Path, encoders: dict[str, Encoder]) -> dict[str, dict[str, float]]:
    """Masked-token loss and accuracy of each encoder on the distillation run's validation blocks, with the
    same standard masks for all."""
    from distill.batching import eval_batches
    from distill.corpus import build_corpus
    from distill.masking import MLMCollator, standard_masking
    from distill.metrics import evaluate_mlm
    from distill.recipe_loader import resolve
    from students.tokenizer import get_tokenizer

    recipe = resolve(distill_run / "recipe.yaml")
    tokenizer = get_tokenizer(recipe.tokenizer)
    corpus = build_corpus(recipe.data, tokenizer)
    collator = MLMCollator(tokenizer, standard_masking(recipe.masking))
    val = eval_batches(corpus.validation, 32, 1000, seed=1234)
    return {name: evaluate_mlm(e.model, val, collator, torch.device("cpu")) for name, e in encoders.items()}


@dataclass
class FinetuneResult:
    """A fine-tuning run's results.json and its best model."""

    results: dict[str, Any]
    model: torch.nn.Module

    @property
    def test(self) -> dict[str, Any]:
        return self.results["test"]


def load_finetune(run: Path) -> FinetuneResult:
    from distill.downstream.finetune import load_classifier

    results = json.loads((run / "results.json").read_text())
    best = run / "best" if (run / "best").is_dir() else run  # (runs of earlier versions kept best/)
    return FinetuneResult(results, load_classifier(str(best), results["label_names"]).eval())


# ------------------------------------------------------------------------------------------ ablation
@dataclass
class Variant:
    """One ablation variant: its distillation runs and their fine-tunes, one pair per seed."""

    name: str
    distill_runs: list[Path]
    finetune_runs: list[Path]


def parse_ablation(spec: str) -> Variant:
    """NAME=DISTILL_RUN[+DISTILL_RUN...],FINETUNE_RUN[+FINETUNE_RUN...] (one run per seed)."""
    name, _, runs = spec.partition("=")
    d_runs, _, f_runs = runs.partition(",")
    variant = Variant(name, [Path(x) for x in d_runs.split("+") if x], [Path(x) for x in f_runs.split("+") if x])
    if not variant.distill_runs or len(variant.distill_runs) != len(variant.finetune_runs):
        raise SystemExit(f"error: --ablation {spec!r}: give NAME=D1[+D2...],F1[+F2...] with one fine-tune per run")
    return variant


@dataclass
class VariantMetrics:
    """A variant's held-out MLM and topic accuracy with 95 % intervals, and what their differences need:
    the per-seed values, and for a single run the masked-token count and per-example test results."""

    mlm: stats.Interval
    topic: stats.Interval
    seeds: int
    mlm_runs: list[float]
    topic_runs: list[float]
    correct: list[int] | None = None  # per test example, single runs only
    mlm_tokens: int | None = None  # masked tokens evaluated, single runs only

    def runs(self, key: str) -> list[float]:
        return self.mlm_runs if key == "mlm" else self.topic_runs

    def interval(self, key: str) -> stats.Interval:
        return self.mlm if key == "mlm" else self.topic


def _last_eval(run: Path) -> tuple[float, int]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/student_mlm_accuracy" in r]
    if not evals:
        raise SystemExit(f"error: {run}/metrics.jsonl has no evaluation")
    return evals[-1]["eval/student_mlm_accuracy"], int(evals[-1].get("eval/student_tokens", 0))


def variant_metrics(variant: Variant) -> VariantMetrics:
    """Intervals across seeds (Student t) when the variant has several runs; for one run, a binomial
    interval over the masked tokens (MLM) and a bootstrap over the test examples (topics)."""
    mlm = [_last_eval(r) for r in variant.distill_runs]
    results = [json.loads((r / "results.json").read_text()) for r in variant.finetune_runs]
    topic = [r["test"]["accuracy"] for r in results]
    if len(mlm) > 1:
        return VariantMetrics(stats.mean_ci([a for a, _ in mlm]), stats.mean_ci(topic), len(mlm),
                              [a for a, _ in mlm], topic)
    (acc, n), = mlm
    se = stats.binomial_se(acc, max(n, 1))
    mlm_ci = stats.Interval(acc, acc - 1.96 * se, acc + 1.96 * se, n, f"binomial, {n} masked tokens")
    correct = results[0]["test"].get("correct")
    topic_ci = (stats.bootstrap_ci(correct) if correct else
                stats.Interval(topic[0], -math.inf, math.inf, 1, "no per-example results"))
    return VariantMetrics(mlm_ci, topic_ci, 1, [acc], topic, correct, n)


def difference(a: VariantMetrics, b: VariantMetrics, key: str) -> stats.Interval:
    """a - b for metric `key` ("mlm" or "topic") with a 95 % interval: Welch across seeds, a paired
    bootstrap over the same test examples for single runs (topics), or two independent binomials (MLM)."""
    if a.seeds > 1 and b.seeds > 1:
        return stats.welch_diff_ci(a.runs(key), b.runs(key))
    if key == "topic" and a.correct and b.correct and len(a.correct) == len(b.correct):
        return stats.paired_bootstrap_diff(a.correct, b.correct)
    if key == "mlm" and a.mlm_tokens and b.mlm_tokens:
        pa, pb = a.mlm_runs[0], b.mlm_runs[0]
        se = math.sqrt(stats.binomial_se(pa, a.mlm_tokens) ** 2 + stats.binomial_se(pb, b.mlm_tokens) ** 2)
        return stats.Interval(pa - pb, pa - pb - 1.96 * se, pa - pb + 1.96 * se, a.mlm_tokens, "two binomials")
    est = sum(a.runs(key)) / len(a.runs(key)) - sum(b.runs(key)) / len(b.runs(key))
    return stats.Interval(est, -math.inf, math.inf, 0, "no interval (mixed seeds)")
