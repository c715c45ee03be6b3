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
from distill.metrics import MaskedLMScores, unpack_correct


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


def held_out_mlm(distill_run: Path, encoders: dict[str, Encoder]) -> dict[str, MaskedLMScores]:
    """Each encoder scored token by token on the distillation run's own held-out evaluation (its validation
    blocks, mask draws and seeds, as a one-process run evaluates them), the same masks for all: the run's
    student scores exactly what its last evaluation recorded, and student and teacher pair token by token."""
    from distill.batching import eval_batches
    from distill.build import run_recipe
    from distill.corpus import build_corpus
    from distill.masking import MLMCollator, standard_masking
    from distill.metrics import score_mlm
    from students.tokenizer import get_tokenizer

    recipe = run_recipe(distill_run)
    tokenizer = get_tokenizer(recipe.tokenizer)
    corpus = build_corpus(recipe.data, tokenizer)
    collator = MLMCollator(tokenizer, standard_masking(recipe.masking))
    train_cfg = recipe.train
    val = eval_batches(corpus.validation, train_cfg.batch_size, train_cfg.eval_batches, train_cfg.eval_seed,
                       train_cfg.eval_mask_draws)
    return {name: score_mlm(e.model, val, collator, torch.device("cpu")) for name, e in encoders.items()}


@dataclass
class FinetuneResult:
    """A fine-tuning run's results.json and its best model."""

    results: dict[str, Any]
    model: torch.nn.Module

    @property
    def test(self) -> dict[str, Any]:
        return self.results["test"]


def read_results(run: Path) -> dict[str, Any]:
    """A finished fine-tune's results.json, refused in one line when it is missing, damaged or has no test
    accuracy."""
    path = run / "results.json"
    if not path.is_file():
        raise SystemExit(f"error: {run} has no results.json: give the directory of a finished fine-tune")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
        accuracy = results["test"]["accuracy"]
    except (ValueError, TypeError, KeyError) as e:
        raise SystemExit(f"error: {path} is damaged ({type(e).__name__}: {e}); rerun the fine-tune") from None
    if isinstance(accuracy, bool) or not isinstance(accuracy, (int, float)) or not 0 <= accuracy <= 1:
        raise SystemExit(f"error: {path} has test accuracy {accuracy!r}, not a number in [0, 1]; rerun the fine-tune")
    return results


def load_finetune(run: Path) -> FinetuneResult:
    from distill.downstream.finetune import load_classifier

    results = read_results(run)
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
    """NAME=DISTILL_RUN[+DISTILL_RUN...][,FINETUNE_RUN[+FINETUNE_RUN...]] (one run per seed; without fine-tunes
    the variant has held-out MLM only)."""
    name, _, runs = spec.partition("=")
    d_runs, _, f_runs = runs.partition(",")
    variant = Variant(name, [Path(x) for x in d_runs.split("+") if x], [Path(x) for x in f_runs.split("+") if x])
    if not name or not variant.distill_runs or len(variant.finetune_runs) not in (0, len(variant.distill_runs)):
        raise SystemExit(f"error: --ablation {spec!r}: give NAME=D1[+D2...][,F1[+F2...]] with one fine-tune per "
                         "distillation run, or none")
    for run in variant.distill_runs:
        if not (run / "metrics.jsonl").is_file():
            raise SystemExit(f"error: --ablation {name}: {run} has no metrics.jsonl: give a distillation run directory")
    for run in variant.finetune_runs:
        if not (run / "results.json").is_file():
            raise SystemExit(f"error: --ablation {name}: {run} has no results.json: give a finished fine-tune")
    return variant


@dataclass
class HeldOut:
    """A distillation run's last held-out MLM evaluation: accuracy over `tokens` masked tokens, and, where the
    run kept it (heldout.json), per-token correctness with the fingerprint of the tokens scored."""

    accuracy: float
    tokens: int
    correct: torch.Tensor | None = None
    fingerprint: str | None = None


@dataclass
class VariantMetrics:
    """A variant's held-out MLM and topic accuracy with 95 % intervals, and what their differences need:
    the per-seed values, and for a single run the per-token (MLM) and per-example (topics) results. `topic`
    is None for a variant without fine-tunes."""

    mlm: stats.Interval
    topic: stats.Interval | None
    seeds: int
    mlm_runs: list[float]
    topic_runs: list[float]
    correct: list[int] | None = None  # per test example, single runs only
    heldout: HeldOut | None = None  # single runs only
    train_seeds: list[int] | None = None  # each distillation run's train.seed (None where a run lacks it)

    def runs(self, key: str) -> list[float]:
        return self.mlm_runs if key == "mlm" else self.topic_runs

    def interval(self, key: str) -> stats.Interval | None:
        return self.mlm if key == "mlm" else self.topic


def last_heldout(run: Path) -> HeldOut:
    """The last evaluation in metrics.jsonl, with heldout.json's per-token results when that file belongs to
    it (same step, same accuracy)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {run} has no metrics.jsonl: give a distillation run directory")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else {}
        except ValueError:
            raise SystemExit(f"error: {path} line {number} is not JSON; repair or remove that line") from None
        if not isinstance(row, dict):
            raise SystemExit(f"error: {path} line {number} is not a JSON object; repair or remove that line")
        rows.append(row)
    evals = [r for r in rows if "eval/student_mlm_accuracy" in r]
    if not evals:
        raise SystemExit(f"error: {run}/metrics.jsonl has no evaluation")
    last = evals[-1]
    got = HeldOut(last["eval/student_mlm_accuracy"], int(last.get("eval/student_tokens", 0)))
    path = run / "heldout.json"
    if path.is_file():
        try:
            record = json.loads(path.read_text())
            student = record.get("student", {})
            if record.get("step") == last["step"] and student.get("mlm_accuracy") == got.accuracy:
                got.correct = unpack_correct(student["correct"], int(record["tokens"]))
                got.fingerprint = str(record["fingerprint"])
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise SystemExit(f"error: {path} is damaged ({type(e).__name__}: {e}); delete it to compare this run "
                             "unpaired") from None
    return got


def train_seed(run: Path) -> int | None:
    """The train.seed a distillation run was trained with (its recipe.yaml), None where it has no record."""
    from distill.build import read_saved_recipe
    from distill.recipes import RecipeError

    try:
        saved = read_saved_recipe(run)
    except RecipeError as e:
        raise SystemExit(f"error: {e}") from None
    seed = ((saved or {}).get("train") or {}).get("seed")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def variant_metrics(variant: Variant) -> VariantMetrics:
    """Intervals across seeds (Student t) when the variant has several runs; for one run, a binomial
    interval over the masked tokens (MLM) and a bootstrap over the test examples (topics). A fine-tune
    belongs to the distillation run at its position (one pair per seed)."""
    mlm = [last_heldout(r) for r in variant.distill_runs]
    results = [read_results(r) for r in variant.finetune_runs]
    topic = [r["test"]["accuracy"] for r in results]
    seeds = [train_seed(r) for r in variant.distill_runs]
    seeds = None if None in seeds else seeds
    if len(mlm) > 1:
        accs = [h.accuracy for h in mlm]
        return VariantMetrics(stats.mean_ci(accs), stats.mean_ci(topic) if topic else None, len(mlm), accs, topic,
                              train_seeds=seeds)
    (h,) = mlm
    se = stats.binomial_se(h.accuracy, max(h.tokens, 1))
    mlm_ci = stats.Interval(h.accuracy, h.accuracy - 1.96 * se, h.accuracy + 1.96 * se, h.tokens,
                            f"binomial, {h.tokens} masked tokens")
    correct = results[0]["test"].get("correct") if results else None
    topic_ci = None
    if results:
        topic_ci = (stats.bootstrap_ci(correct) if correct else
                    stats.Interval(topic[0], -math.inf, math.inf, 1, "no per-example results"))
    return VariantMetrics(mlm_ci, topic_ci, 1, [h.accuracy], topic, correct, h, seeds)


def _same_seeds(a: VariantMetrics, b: VariantMetrics) -> bool:
    sa, sb = a.train_seeds, b.train_seeds
    return sa is not None and sb is not None and len(set(sa)) == len(sa) == len(sb) and set(sa) == set(sb)


def difference(a: VariantMetrics, b: VariantMetrics, key: str) -> stats.Interval | None:
    """a - b for metric `key` ("mlm" or "topic") with a 95 % interval. Across seeds: paired by seed (a t
    interval on the per-seed differences) where both variants ran the same training seeds -- a seed fixes the
    data order and the masks, and what it does to both cancels in their difference --, else Welch's; for single
    runs, paired on the same items where both kept per-item results (topics: a paired bootstrap over the same test
    examples; MLM: McNemar-Wald over the same masked tokens, checked by their fingerprint), else two
    independent binomials (MLM). None when either variant lacks the metric. A single run's interval covers
    the sampling of test items only, not the variation between training seeds."""
    if a.interval(key) is None or b.interval(key) is None:
        return None
    if a.seeds > 1 and b.seeds > 1:
        if _same_seeds(a, b):
            b_by_seed = dict(zip(b.train_seeds, b.runs(key)))
            return stats.paired_t_diff(a.runs(key), [b_by_seed[s] for s in a.train_seeds])
        return stats.welch_diff_ci(a.runs(key), b.runs(key))
    if key == "topic" and a.correct and b.correct and len(a.correct) == len(b.correct):
        return stats.paired_bootstrap_diff(a.correct, b.correct)
    if key == "mlm" and a.heldout and b.heldout:
        ha, hb = a.heldout, b.heldout
        if ha.correct is not None and hb.correct is not None and ha.fingerprint == hb.fingerprint:
            return stats.paired_proportion_diff(ha.correct, hb.correct)
        if ha.tokens and hb.tokens:
            pa, pb = ha.accuracy, hb.accuracy
            se = math.sqrt(stats.binomial_se(pa, ha.tokens) ** 2 + stats.binomial_se(pb, hb.tokens) ** 2)
            return stats.Interval(pa - pb, pa - pb - 1.96 * se, pa - pb + 1.96 * se, ha.tokens, "two binomials")
    est = sum(a.runs(key)) / len(a.runs(key)) - sum(b.runs(key)) / len(b.runs(key))
    return stats.Interval(est, -math.inf, math.inf, 0, "no interval (mixed seeds)")
