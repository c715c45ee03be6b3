"""The teacher-vs-student report: a markdown table and PNG figures in one directory.

    python -m distill.downstream.report --teacher TEACHER_DIR --student runs/wiki/student \\
        --distill-run runs/wiki --teacher-finetune runs/finetune/teacher --student-finetune runs/finetune/student \\
        [--ablation NAME=DISTILL_RUN[,FINETUNE_RUN] ...] --output runs/report
    python -m distill.downstream.report --ablation NAME=DISTILL_RUN[,FINETUNE_RUN] ... --output DIR   (table only)

Measures, in this process (distill.downstream.measure): parameters, size on disk, inference latency of
the encoders (batch 1 and 32, sequence 128; `torch.utils.benchmark`, median and interquartile range over
interleaved rounds; teacher and student both run through the kit's DistilBERT implementation, the teacher
converted layer by layer, so the difference is the architecture, not the code), held-out masked-LM
accuracy on the distillation run's own held-out evaluation (same masks for both; the student / teacher
ratio's interval is paired token by token); and reads the fine-tuning
runs' results.json for downstream accuracy / macro-F1. distill.downstream.render draws it.
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

from distill import stats
from distill.downstream import measure, render
from distill.downstream.render import Row
from distill.mechanics import Latency, latency
from distill.metrics import MaskedLMScores


@dataclass
class Measurements:
    """Everything the teacher-vs-student table shows, per model ("teacher", "student")."""

    encoders: dict[str, measure.Encoder]
    latency: dict[str, dict[int, Latency]]
    mlm: dict[str, MaskedLMScores]  # empty without a distillation run
    finetunes: dict[str, measure.FinetuneResult]  # the models that have a fine-tuning run

    def summary(self) -> dict[str, Any]:
        return {"parameters": {k: e.parameters for k, e in self.encoders.items()},
                "disk_mb": {k: e.disk_mb for k, e in self.encoders.items()},
                "latency_ms": {k: {b: vars(x) for b, x in v.items()} for k, v in self.latency.items()},
                "mlm": {k: v.metrics() for k, v in self.mlm.items()},
                "downstream": {k: {"accuracy": f.test["accuracy"], "macro_f1": f.test["macro_f1"]}
                               for k, f in self.finetunes.items()}}


def take_measurements(args: argparse.Namespace) -> Measurements:
    progress = tqdm(total=3, desc="report")
    encoders = {"teacher": measure.load_encoder(args.teacher), "student": measure.load_encoder(args.student)}
    finetunes = {name: measure.load_finetune(run) for name, run in
                 (("teacher", args.teacher_finetune), ("student", args.student_finetune)) if run}
    progress.update()
    timed = latency({name: e.model.encode for name, e in encoders.items()}, [1, 32], args.repeats)
    progress.update()
    mlm = measure.held_out_mlm(args.distill_run, encoders) if args.distill_run else {}
    progress.update()
    progress.close()
    return Measurements(encoders, timed, mlm, finetunes)


def with_interval(ratio: stats.Interval) -> str:
    return f"{ratio.estimate:.1%} (95 % CI {ratio.low:.1%}–{ratio.high:.1%})"


def comparison_rows(m: Measurements) -> list[Row]:
    teacher, student = m.encoders["teacher"], m.encoders["student"]

    def downstream(key: str, label: str) -> Row:
        got = {name: f.test[key] for name, f in m.finetunes.items()}
        cells = [f"{got[name]:.4f}" if name in got else "—" for name in ("teacher", "student")]
        ratio = f"{got['student'] / got['teacher']:.1%}" if len(got) == 2 else "—"
        correct = [m.finetunes[name].test.get("correct") for name in ("student", "teacher") if name in got]
        if key == "accuracy" and len(correct) == 2 and all(correct) and len(correct[0]) == len(correct[1]):
            ratio = with_interval(stats.paired_bootstrap_ratio(*correct))  # the same test examples
        return Row(label, *cells, ratio)

    rows = [Row("parameters", f"{teacher.parameters:,}", f"{student.parameters:,}",
                f"{student.parameters / teacher.parameters:.1%}"),
            Row("size on disk (MB)", f"{teacher.disk_mb:.1f}", f"{student.disk_mb:.1f}",
                f"{student.disk_mb / teacher.disk_mb:.1%}")]
    for batch in (1, 32):
        t, s = m.latency["teacher"][batch], m.latency["student"][batch]
        rows.append(Row(f"CPU latency, batch {batch} x 128 (ms, median (IQR))", str(t), str(s),
                        f"{t.median / s.median:.2f}x faster"))
    if m.mlm:
        t, s = m.mlm["teacher"].metrics(), m.mlm["student"].metrics()
        ratio = (with_interval(stats.paired_proportion_ratio(m.mlm["student"].correct, m.mlm["teacher"].correct))
                 if min(s["mlm_accuracy"], t["mlm_accuracy"]) > 0 else "—")  # the same masked tokens
        rows.append(Row("held-out masked-token accuracy", f"{t['mlm_accuracy']:.4f}", f"{s['mlm_accuracy']:.4f}",
                        ratio))
    rows.append(downstream("accuracy", "downstream test accuracy"))
    rows.append(downstream("macro_f1", "downstream test macro-F1"))
    return rows


def _interval(ci: stats.Interval | None) -> dict[str, Any] | None:
    """An interval for JSON (an unbounded end as null)."""
    if ci is None:
        return None
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in vars(ci).items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", type=Path, help="teacher MLM directory")
    p.add_argument("--student", type=Path, help="student export (runs/<run>/student)")
    p.add_argument("--distill-run", type=Path, help="distillation run directory (curves, validation data)")
    p.add_argument("--teacher-finetune", type=Path, help="fine-tuning run of the teacher")
    p.add_argument("--student-finetune", type=Path, help="fine-tuning run of the student")
    p.add_argument("--ablation", action="append", default=[],
                   help="NAME=DISTILL_RUN[+RUN...][,FINETUNE_RUN[+RUN...]] (one run per seed; without fine-tunes: "
                   "held-out MLM only); the first is the baseline. Alone (no --teacher/--student): the ablation "
                   "table only, from the runs' metrics.jsonl, heldout.json and results.json")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--wandb", metavar="PROJECT", help="also log the table and figures to a wandb run (job_type "
                   "report, grouped with the distillation run); WANDB_MODE decides online/offline")
    args = p.parse_args(argv)
    if (args.teacher is None) != (args.student is None):
        raise SystemExit("error: give both --teacher and --student (or neither, for the ablation table alone)")
    if args.teacher is None and not args.ablation:
        raise SystemExit("error: nothing to report: give --teacher and --student, or --ablation")
    for path in (args.teacher, args.student):
        if path is not None and not path.is_dir():
            raise SystemExit(f"error: {path} is not a model directory")
    for flag, path in (("--distill-run", args.distill_run), ("--teacher-finetune", args.teacher_finetune),
                       ("--student-finetune", args.student_finetune)):
        if path is not None and not path.is_dir():
            raise SystemExit(f"error: {flag} {path} is not a directory")
    if args.repeats < 1:
        raise SystemExit(f"error: --repeats must be >= 1, got {args.repeats}")
    if args.output.exists() and not args.output.is_dir():
        raise SystemExit(f"error: --output {args.output} is a file; give a directory")
    variants = [measure.parse_ablation(spec) for spec in args.ablation]  # (refused before any work)
    args.output.mkdir(parents=True, exist_ok=True)

    lines, figures, rows, summary = [], [], [], {}
    if args.teacher is not None:
        m = take_measurements(args)
        if args.distill_run and (args.distill_run / "metrics.jsonl").exists():
            figures.append(render.plot_curves(args.distill_run, args.output))
        for name, f in m.finetunes.items():
            figures.append(render.plot_confusion(f.results, name, args.output, name))
        rows = comparison_rows(m)
        lines = ["# Teacher vs student", "", f"teacher: `{args.teacher}`  ", f"student: `{args.student}`  ",
                 f"threads: {torch.get_num_threads()}, torch {torch.__version__}; latency: encoder forward, both "
                 "models through the kit's DistilBERT implementation, torch.utils.benchmark blocks", "",
                 *render.comparison_table(rows)]
        summary = m.summary()
    if variants:
        measured = [(v.name, measure.variant_metrics(v)) for v in variants]
        lines += ["", *render.ablation_table(measured)]
        base = measured[0][1]
        summary["ablation"] = {name: {"seeds": vm.seeds, "mlm": _interval(vm.mlm), "topic": _interval(vm.topic),
                                      **({f"delta_{key}": _interval(measure.difference(vm, base, key))
                                          for key in ("mlm", "topic")} if i else {})}
                               for i, (name, vm) in enumerate(measured)}
    lines += [""] + [f"![{f}]({f})" for f in figures]
    (args.output / "report.md").write_text("\n".join(lines).lstrip("\n") + "\n")
    (args.output / "report.json").write_text(json.dumps(summary, indent=2))
    if args.wandb:
        render.log_to_wandb(args.wandb, args.distill_run, args.output, rows, figures, summary)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
