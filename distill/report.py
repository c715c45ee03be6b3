"""The teacher-vs-student report: a markdown table and PNG figures in one directory.

    python -m distill.report --teacher TEACHER_DIR --student runs/wiki/student \\
        --distill-run runs/wiki --teacher-finetune runs/finetune/teacher --student-finetune runs/finetune/student \\
        [--ablation NAME=DISTILL_RUN,FINETUNE_RUN ...] --output runs/report

Measures, in this process: parameters, size on disk, inference latency of the encoders (batch 1 and 32,
sequence 128; `torch.utils.benchmark`, median and interquartile range over interleaved rounds; teacher and
student both run through the kit's DistilBERT implementation, the teacher converted layer by layer, so the
difference is the architecture, not the code), held-out masked-LM accuracy on the distillation run's
validation blocks (same masks for both); and reads the fine-tuning runs' results.json for downstream
accuracy / macro-F1.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm


def disk_mb(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors")) / 2**20


def encoder(directory: Path):
    """(name, encode(ids, mask) -> last hidden, predict(rows) -> logits, n_params) for an MLM directory."""
    from transformers import AutoConfig

    from students.modeling import DistilBERTForMaskedLM
    from teachers.teacher import Teacher

    if AutoConfig.from_pretrained(directory).model_type == "distilbert":
        m = DistilBERTForMaskedLM.from_pretrained(directory).eval()
        return (lambda i, a: m.distilbert(i, a).last_hidden_state), m.predict_tokens, m
    t = Teacher.load(str(directory))
    return (lambda i, a: t(i, a).last_hidden_state), t.predict_tokens, t.model


@dataclass
class Latency:
    """Milliseconds per forward: median and interquartile range of `torch.utils.benchmark` blocks."""

    median: float
    iqr: float
    blocks: int

    def __str__(self) -> str:
        return f"{self.median:.3g} (IQR {self.iqr:.2g})"


def latency(models: dict[str, Any], batches: list[int], repeats: int, device: torch.device | str = "cpu",
            seq_len: int = 128) -> dict[str, dict[int, Latency]]:
    """Per model and batch size, `repeats` interleaved rounds of `Timer.blocked_autorange` (each round a
    block-timed measurement, CUDA synchronised by the timer); the blocks of all rounds are pooled into one
    median and IQR, so drift over time affects every model alike."""
    from torch.utils import benchmark

    device = torch.device(device)
    out: dict[str, dict[int, Latency]] = {name: {} for name in models}
    for B in batches:
        ids = torch.randint(1000, 30000, (B, seq_len), device=device)
        mask = torch.ones_like(ids)
        times: dict[str, list[float]] = {name: [] for name in models}
        with torch.inference_mode():
            for fn in models.values():
                fn(ids, mask)  # warm-up
            for _ in range(max(1, repeats // 4 if B > 1 else repeats // 2)):
                for name, fn in models.items():
                    timer = benchmark.Timer(stmt="fn(ids, mask)", globals={"fn": fn, "ids": ids, "mask": mask},
                                            num_threads=torch.get_num_threads())
                    times[name] += timer.blocked_autorange(min_run_time=0.05).times
        for name, t in times.items():
            q = torch.tensor(t, dtype=torch.float64).quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
            out[name][B] = Latency(median=1e3 * q[1].item(), iqr=1e3 * (q[2] - q[0]).item(), blocks=len(t))
    return out


def held_out_mlm(distill_run: Path, encoders: dict[str, tuple]) -> dict[str, dict[str, float]]:
    from distill.data import build_corpus, eval_batches
    from distill.masking import MLMCollator, standard_masking
    from distill.metrics import evaluate_mlm
    from distill.recipes import resolve
    from students.tokenizer import get_tokenizer

    recipe = resolve(distill_run / "recipe.yaml")
    tokenizer = get_tokenizer(recipe.tokenizer)
    corpus = build_corpus(recipe.data, tokenizer)
    collator = MLMCollator(tokenizer, standard_masking(recipe.masking))
    val = eval_batches(corpus.validation, 32, 1000, seed=1234)
    return {name: evaluate_mlm(pred, enc, val, collator, torch.device("cpu")) for name, (enc, pred) in encoders.items()}


def plot_curves(distill_run: Path, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in (distill_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss/total" in r]
    evals = [r for r in rows if "eval/student_mlm_accuracy" in r]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4))
    for key in ("total", "ce", "mlm", "cos"):
        pts = [(r["step"], r[f"loss/{key}"]) for r in train if f"loss/{key}" in r]
        if pts:
            a.plot(*zip(*pts), label=key)
    a.set(xlabel="step", ylabel="loss", title="distillation losses", yscale="log")
    a.legend()
    if evals:
        b.plot([r["step"] for r in evals], [r["eval/student_mlm_accuracy"] for r in evals], "o-", label="student")
        b.axhline(evals[-1]["eval/teacher_mlm_accuracy"], color="k", ls="--", label="teacher")
    b.set(xlabel="step", ylabel="held-out masked-token accuracy", title="validation")
    b.legend()
    speed = [r for r in train if "tokens_per_s" in r]
    if speed:
        steps = [r["step"] for r in speed]
        c.plot(steps, [r["tokens_per_s"] for r in speed], color="tab:blue", label="tokens/s")
        c.set(xlabel="step", ylabel="tokens/s", title="learning rate, throughput, MFU")
        lr = c.twinx()
        lr.plot(steps, [r["lr"] for r in speed], color="tab:orange", label="learning rate")
        lr.set_ylabel("learning rate")
        lines = c.get_lines() + lr.get_lines()
        if any("mfu" in r for r in speed):
            mfu = c.twinx()
            mfu.spines["right"].set_position(("axes", 1.18))
            mfu.plot(steps, [100 * r.get("mfu", float("nan")) for r in speed], color="tab:green", label="MFU %")
            mfu.set_ylabel("MFU (%)")
            lines += mfu.get_lines()
        c.legend(lines, [x.get_label() for x in lines], loc="lower right")
    fig.tight_layout()
    path = out / "training_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot_confusion(results: dict, title: str, out: Path, name: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = torch.tensor(results["test"]["confusion_matrix"], dtype=torch.float64)
    norm = cm / cm.sum(1, keepdim=True).clamp(min=1)
    labels = list(results["label_names"])  # full names: the figure grows with them
    width = max(len(n) for n in labels)
    side = 4 + 0.45 * len(labels) + 0.07 * width
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=9)
    ax.set_yticks(range(len(labels)), labels, fontsize=9)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if cm[i, j]:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=f"{title}: test accuracy {results['test']['accuracy']:.3f}")
    fig.tight_layout()
    path = out / f"confusion_{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


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


def _last_eval(run: Path) -> tuple[float, int]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/student_mlm_accuracy" in r]
    if not evals:
        raise SystemExit(f"error: {run}/metrics.jsonl has no evaluation")
    return evals[-1]["eval/student_mlm_accuracy"], int(evals[-1].get("eval/student_tokens", 0))


def metric_intervals(variant: Variant) -> dict[str, Any]:
    """Held-out MLM and topic accuracy of a variant with 95 % intervals: across seeds (Student t) when it
    has several runs; for one run, a binomial interval over the masked tokens (MLM) and a bootstrap over
    the test examples (topics)."""
    from distill import stats

    mlm = [_last_eval(r) for r in variant.distill_runs]
    results = [json.loads((r / "results.json").read_text()) for r in variant.finetune_runs]
    topic = [r["test"]["accuracy"] for r in results]
    if len(mlm) > 1:
        return {"mlm": stats.mean_ci([a for a, _ in mlm]), "topic": stats.mean_ci(topic), "seeds": len(mlm),
                "mlm_runs": [a for a, _ in mlm], "topic_runs": topic, "correct": None, "mlm_n": None}
    (acc, n), = mlm
    se = stats.binomial_se(acc, max(n, 1))
    mlm_ci = stats.Interval(acc, acc - 1.96 * se, acc + 1.96 * se, n, f"binomial, {n} masked tokens")
    correct = results[0]["test"].get("correct")
    topic_ci = (stats.bootstrap_ci(correct) if correct else
                stats.Interval(topic[0], -math.inf, math.inf, 1, "no per-example results"))
    return {"mlm": mlm_ci, "topic": topic_ci, "seeds": 1, "mlm_runs": [acc], "topic_runs": topic,
            "correct": correct, "mlm_n": n}


def difference(a: dict[str, Any], b: dict[str, Any], key: str):
    """a - b for metric `key` ("mlm" or "topic") with a 95 % interval: Welch across seeds, a paired
    bootstrap over the same test examples for single runs (topics), or two independent binomials (MLM)."""
    from distill import stats

    if a["seeds"] > 1 and b["seeds"] > 1:
        return stats.welch_diff_ci(a[f"{key}_runs"], b[f"{key}_runs"])
    if key == "topic" and a["correct"] and b["correct"] and len(a["correct"]) == len(b["correct"]):
        return stats.paired_bootstrap_diff(a["correct"], b["correct"])
    if key == "mlm" and a["mlm_n"] and b["mlm_n"]:
        pa, pb = a["mlm_runs"][0], b["mlm_runs"][0]
        se = math.sqrt(stats.binomial_se(pa, a["mlm_n"]) ** 2 + stats.binomial_se(pb, b["mlm_n"]) ** 2)
        return stats.Interval(pa - pb, pa - pb - 1.96 * se, pa - pb + 1.96 * se, a["mlm_n"], "two binomials")
    est = sum(a[f"{key}_runs"]) / len(a[f"{key}_runs"]) - sum(b[f"{key}_runs"]) / len(b[f"{key}_runs"])
    return stats.Interval(est, -math.inf, math.inf, 0, "no interval (mixed seeds)")


def ablation_table(variants: list[Variant]) -> list[str]:
    """Markdown: each variant's metrics (mean ± 95 % CI half-width, in points) and its difference to the
    first variant (the baseline), marked ✓ where the interval excludes 0 (a resolved difference)."""
    got = [(v, metric_intervals(v)) for v in variants]
    base_name, base = got[0][0].name, got[0][1]
    lines = ["## Ablation", "",
             f"Mean ± 95 % CI half-width, in points. Δ: difference to `{base_name}` with its 95 % CI; ✓ marks a "
             "resolved difference (the interval excludes 0). Intervals: across seeds (Student t / Welch) when a "
             "variant has several runs, else over masked tokens (binomial) and test examples (bootstrap, paired).",
             "", "| variant | seeds | held-out MLM accuracy | Δ MLM | topic test accuracy | Δ topics |",
             "| --- | --- | --- | --- | --- | --- |"]
    for v, m in got:
        cells = []
        for key in ("mlm", "topic"):
            if v.name == base_name:
                cells += [m[key].fmt(), "—"]
                continue
            d = difference(m, base, key)
            mark = " ✓" if d.resolved else ""
            cells += [m[key].fmt(), f"{100 * d.estimate:+.1f} ± {100 * d.half_width:.1f}{mark}"]
        lines.append(f"| {v.name} | {m['seeds']} | {' | '.join(cells)} |")
    return lines


def log_to_wandb(project: str, distill_run: Path | None, output: Path, rows: list[tuple], figures: list[str],
                 summary: dict) -> None:
    """The report as a wandb run: the table, the figures as images, the numbers in the summary."""
    import wandb

    from distill.tracking import flatten, wandb_mode

    group = distill_run.name if distill_run else None
    run = wandb.init(project=project, job_type="report", group=group, name=f"report-{group or output.name}",
                     mode=wandb_mode(), dir=str(output))
    table = wandb.Table(columns=["", "teacher", "student", "student / teacher"], data=[list(r) for r in rows])
    run.log({"report/table": table, **{f"report/{Path(f).stem}": wandb.Image(str(output / f)) for f in figures}})
    run.summary.update(flatten(summary))
    run.finish()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", type=Path, required=True, help="teacher MLM directory")
    p.add_argument("--student", type=Path, required=True, help="student export (runs/<run>/student)")
    p.add_argument("--distill-run", type=Path, help="distillation run directory (curves, validation data)")
    p.add_argument("--teacher-finetune", type=Path, help="fine-tuning run of the teacher")
    p.add_argument("--student-finetune", type=Path, help="fine-tuning run of the student")
    p.add_argument("--ablation", action="append", default=[],
                   help="NAME=DISTILL_RUN[+RUN...],FINETUNE_RUN[+RUN...] (one pair per seed); the first is the "
                   "baseline")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--wandb", metavar="PROJECT", help="also log the table and figures to a wandb run (job_type "
                   "report, grouped with the distillation run); WANDB_MODE decides online/offline")
    args = p.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    for path in (args.teacher, args.student):
        if not path.is_dir():
            raise SystemExit(f"error: {path} is not a model directory")

    steps = tqdm(total=4, desc="report")
    enc = {"teacher": encoder(args.teacher), "student": encoder(args.student)}
    params = {k: sum(x.numel() for x in v[2].parameters()) for k, v in enc.items()}
    size = {"teacher": disk_mb(args.teacher), "student": disk_mb(args.student)}
    steps.update()
    clf = {}
    for name, run in (("teacher", args.teacher_finetune), ("student", args.student_finetune)):
        if run:
            from distill.finetune import load_classifier

            res = json.loads((run / "results.json").read_text())
            best = run / "best" if (run / "best").is_dir() else run  # (runs of earlier versions kept best/)
            model = load_classifier(str(best), res["label_names"]).eval()
            clf[name] = (res, model)
    lat = latency({name: enc[name][0] for name in ("teacher", "student")}, [1, 32], args.repeats)
    steps.update()
    mlm = held_out_mlm(args.distill_run, {k: (v[0], v[1]) for k, v in enc.items()}) if args.distill_run else {}
    steps.update()

    figures = []
    if args.distill_run and (args.distill_run / "metrics.jsonl").exists():
        figures.append(plot_curves(args.distill_run, args.output))
    for name, (res, _) in clf.items():
        figures.append(plot_confusion(res, name, args.output, name))
    steps.update()
    steps.close()

    def share(key: str, fmt: str = "{:.1%}") -> str:
        if key == "acc" and len(clf) == 2:
            return fmt.format(clf["student"][0]["test"]["accuracy"] / clf["teacher"][0]["test"]["accuracy"])
        if key == "f1" and len(clf) == 2:
            return fmt.format(clf["student"][0]["test"]["macro_f1"] / clf["teacher"][0]["test"]["macro_f1"])
        return "—"

    def cell(name: str, key: str) -> str:
        if name not in clf:
            return "—"
        return f"{clf[name][0]['test'][key]:.4f}"

    rows = [
        ("parameters", f"{params['teacher']:,}", f"{params['student']:,}",
         f"{params['student'] / params['teacher']:.1%}"),
        ("size on disk (MB)", f"{size['teacher']:.1f}", f"{size['student']:.1f}",
         f"{size['student'] / size['teacher']:.1%}"),
        ("CPU latency, batch 1 x 128 (ms, median (IQR))", str(lat["teacher"][1]), str(lat["student"][1]),
         f"{lat['teacher'][1].median / lat['student'][1].median:.2f}x faster"),
        ("CPU latency, batch 32 x 128 (ms, median (IQR))", str(lat["teacher"][32]), str(lat["student"][32]),
         f"{lat['teacher'][32].median / lat['student'][32].median:.2f}x faster"),
    ]
    if mlm:
        rows.append(("held-out masked-token accuracy", f"{mlm['teacher']['mlm_accuracy']:.4f}",
                     f"{mlm['student']['mlm_accuracy']:.4f}",
                     f"{mlm['student']['mlm_accuracy'] / max(mlm['teacher']['mlm_accuracy'], 1e-9):.1%}"))
    rows += [("downstream test accuracy", cell("teacher", "accuracy"), cell("student", "accuracy"), share("acc")),
             ("downstream test macro-F1", cell("teacher", "macro_f1"), cell("student", "macro_f1"), share("f1"))]
    lines = ["# Teacher vs student", "", f"teacher: `{args.teacher}`  ", f"student: `{args.student}`  ",
             f"threads: {torch.get_num_threads()}, torch {torch.__version__}; latency: encoder forward, both models "
             "through the kit's DistilBERT implementation, torch.utils.benchmark blocks", "",
             "| | teacher | student | student / teacher |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    if args.ablation:
        lines += ["", *ablation_table([parse_ablation(spec) for spec in args.ablation])]
    lines += [""] + [f"![{f}]({f})" for f in figures]
    (args.output / "report.md").write_text("\n".join(lines) + "\n")
    summary = {"parameters": params, "disk_mb": size,
               "latency_ms": {k: {b: vars(x) for b, x in v.items()} for k, v in lat.items()}, "mlm": mlm,
               "downstream": {k: {"accuracy": v[0]["test"]["accuracy"], "macro_f1": v[0]["test"]["macro_f1"]}
                              for k, v in clf.items()}}
    (args.output / "report.json").write_text(json.dumps(summary, indent=2))
    if args.wandb:
        log_to_wandb(args.wandb, args.distill_run, args.output, rows, figures, summary)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
