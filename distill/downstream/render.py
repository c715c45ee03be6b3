"""How the report is shown: the teacher-vs-student table (markdown), the ablation table, the training
curves and confusion matrices (PNG), and the same as a wandb run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch

from distill.downstream.measure import VariantMetrics, difference


class Row(NamedTuple):
    """One line of the teacher-vs-student table."""

    label: str
    teacher: str
    student: str
    ratio: str


def comparison_table(rows: list[Row]) -> list[str]:
    return ["| | teacher | student | student / teacher |", "| --- | --- | --- | --- |",
            *(f"| {r.label} | {r.teacher} | {r.student} | {r.ratio} |" for r in rows)]


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


def _paired_mark(method: str) -> str:
    return " (paired)" if "McNemar" in method else " (paired by seed)" if method.startswith("paired t") else ""


def ablation_table(variants: list[tuple[str, VariantMetrics]]) -> list[str]:
    """Markdown: each variant's metrics (mean ± 95 % CI half-width, in points) and its difference to the
    first variant (the baseline), marked ✓ where the interval excludes 0 (a resolved difference)."""
    base_name, base = variants[0]
    lines = ["## Ablation", "",
             f"Mean ± 95 % CI half-width, in points. Δ: difference to `{base_name}` with its 95 % CI; ✓ marks a "
             "resolved difference (the interval excludes 0). Intervals: across seeds (Student t) when a variant "
             "has several runs, its Δ paired by seed where both variants ran the same seeds (marked), otherwise "
             "Welch's; for a single run, over masked tokens (binomial; differences paired token by token where "
             "both runs scored the same tokens) and test examples (bootstrap, paired). A single run's interval covers "
             "the sampling of test items, not the variation between training seeds.",
             "", "| variant | seeds | held-out MLM accuracy | Δ MLM | topic test accuracy | Δ topics |",
             "| --- | --- | --- | --- | --- | --- |"]
    for i, (name, m) in enumerate(variants):
        cells = []
        for key in ("mlm", "topic"):
            own = m.interval(key)
            d = difference(m, base, key) if i else None
            cells.append(own.fmt() if own is not None else "—")
            if d is None:
                cells.append("—")
                continue
            digits = 2 if 100 * d.half_width < 0.1 else 1  # (paired intervals can be hundredths of a point)
            cells.append(f"{100 * d.estimate:+.{digits}f} ± {100 * d.half_width:.{digits}f}"
                         f"{' ✓' if d.resolved else ''}{_paired_mark(d.method)}")
        lines.append(f"| {name} | {m.seeds} | {' | '.join(cells)} |")
    return lines


def log_to_wandb(project: str, distill_run: Path | None, output: Path, rows: list[Row], figures: list[str],
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
