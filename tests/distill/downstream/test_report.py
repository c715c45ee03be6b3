import json
import re
from pathlib import Path

import pytest
import torch

from distill.downstream import measure, render, report
from distill.downstream.finetune import finetune
from distill.recipe_loader import resolve
from distill.train import train
from tests.cli import ROOT
from tests.distill.test_train import recipe

pytestmark = pytest.mark.slow


def test_report_table_and_figures(tiny_teacher_dir, tmp_path, monkeypatch):
    import wandb

    logged = {}

    class Run:
        summary = {}

        def log(self, payload):
            logged.update(payload)

        def finish(self):
            logged["finished"] = True

    monkeypatch.setattr(wandb, "init", lambda **kw: logged.update(init=kw) or Run())
    train(recipe(tiny_teacher_dir, tmp_path / "distill", "train.max_steps=2"))
    for name, model in (("teacher", tiny_teacher_dir), ("student", tmp_path / "distill" / "student")):
        finetune(resolve(ROOT / "recipes/finetune/wiki-topics.yaml", [
            f"model={model}", f"output_dir={tmp_path / name}", "task.max_train_examples=32", "task.max_length=32",
            "train.epochs=1", "train.batch_size=16", "tracking.wandb=false"]))
    out = tmp_path / "report"
    report.main(["--teacher", str(tiny_teacher_dir), "--student", str(tmp_path / "distill" / "student"),
                 "--distill-run", str(tmp_path / "distill"), "--teacher-finetune", str(tmp_path / "teacher"),
                 "--student-finetune", str(tmp_path / "student"), "--repeats", "2", "--output", str(out),
                 "--ablation", f"triple={tmp_path / 'distill'},{tmp_path / 'student'}",
                 "--ablation", f"same={tmp_path / 'distill'},{tmp_path / 'student'}", "--wandb", "kit-tests"])
    md = (out / "report.md").read_text()
    for row in ("parameters", "CPU latency, batch 1", "held-out masked-token accuracy", "downstream test accuracy",
                "## Ablation", "| triple |"):
        assert row in md
    summary = json.loads((out / "report.json").read_text())
    assert summary["parameters"]["student"] < summary["parameters"]["teacher"]
    lat = summary["latency_ms"]["student"]
    assert set(lat) == {"1", "32"} and all(v["median"] > 0 and v["iqr"] >= 0 and v["blocks"] >= 3 for v in lat.values())
    assert "median (IQR)" in md
    # held-out MLM: the run's own evaluation (its blocks, draws and seeds), so the run's exported student scores
    # exactly what its last evaluation recorded; the student / teacher ratio paired on the same tokens
    held = json.loads((tmp_path / "distill" / "heldout.json").read_text())
    assert summary["mlm"]["student"] == {k: held["student"][k] for k in ("mlm_loss", "mlm_accuracy", "tokens")}
    assert summary["mlm"]["teacher"]["mlm_accuracy"] == held["teacher"]["mlm_accuracy"]
    (mlm_row,) = [x for x in md.splitlines() if x.startswith("| held-out masked-token accuracy |")]
    accuracies = [summary["mlm"][k]["mlm_accuracy"] for k in ("student", "teacher")]
    assert ("(95 % CI " in mlm_row) == (min(accuracies) > 0)  # (a ratio needs accuracies > 0; tiny models get 0)
    assert summary["ablation"]["same"]["mlm"]["estimate"] == held["student"]["mlm_accuracy"]
    # report.json carries each variant's difference to the baseline with its interval and method, as the table
    same = summary["ablation"]["same"]
    assert same["delta_mlm"]["estimate"] == 0 and "McNemar" in same["delta_mlm"]["method"]
    assert same["delta_topic"]["estimate"] == 0 and same["delta_topic"]["method"].startswith("paired bootstrap")
    assert "delta_mlm" not in summary["ablation"]["triple"]
    # the ablation table alone, from the run directories
    alone = tmp_path / "alone"
    report.main(["--ablation", f"triple={tmp_path / 'distill'}", "--ablation", f"same={tmp_path / 'distill'}",
                 "--output", str(alone)])
    table = (alone / "report.md").read_text()
    assert table.startswith("## Ablation") and "| same | 1 |" in table and "+0.00 ± 0.00 (paired) | — | — |" in table
    with pytest.raises(SystemExit, match="both --teacher and --student"):
        report.main(["--teacher", str(tiny_teacher_dir), "--output", str(alone)])
    with pytest.raises(SystemExit, match="nothing to report"):
        report.main(["--output", str(alone)])
    # student / teacher test accuracy with its paired-bootstrap interval over the same test articles
    (accuracy_row,) = [x for x in md.splitlines() if x.startswith("| downstream test accuracy |")]
    assert "(95 % CI " in accuracy_row
    for png in ("training_curves.png", "confusion_student.png", "confusion_teacher.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same report in wandb: table, figures as images, grouped with the distillation run
    assert logged["init"]["project"] == "kit-tests" and logged["init"]["group"] == "distill"
    assert logged["init"]["job_type"] == "report" and logged["finished"]
    assert isinstance(logged["report/table"], wandb.Table) and isinstance(logged["report/training_curves"], wandb.Image)
    assert isinstance(logged["report/confusion_student"], wandb.Image)
    # the ablation table: a variant identical to the baseline differs by 0, unresolved
    same = [x for x in md.splitlines() if x.startswith("| same |")][0]
    assert "+0.00 ± 0.00 |" in same and "✓" not in same and "95 % CI" in md


def test_ablation_intervals_across_seeds_and_single_runs(tmp_path):
    """Synthetic runs: three seeds per variant (t and Welch), and single runs (binomial, paired bootstrap)."""
    def runs(name, mlm, topic_correct, seed):
        d, f = tmp_path / f"{name}-{seed}", tmp_path / f"{name}-{seed}-ft"
        d.mkdir()
        f.mkdir()
        (d / "metrics.jsonl").write_text(json.dumps({"step": 200, "eval/student_mlm_accuracy": mlm,
                                                     "eval/student_tokens": 40000}) + "\n")
        acc = sum(topic_correct) / len(topic_correct)
        (f / "results.json").write_text(json.dumps({"test": {"accuracy": acc, "correct": topic_correct}}))
        return d, f

    base = [runs("base", m, [1] * k + [0] * (925 - k), i)
            for i, (m, k) in enumerate([(0.270, 860), (0.268, 855), (0.272, 865)])]
    better = [runs("better", m, [1] * k + [0] * (925 - k), i)
              for i, (m, k) in enumerate([(0.330, 862), (0.336, 858), (0.333, 866)])]

    def spec(name, pairs):
        return f"{name}={'+'.join(str(d) for d, _ in pairs)},{'+'.join(str(f) for _, f in pairs)}"

    def table(*specs):
        return render.ablation_table([(v.name, measure.variant_metrics(v)) for v in map(measure.parse_ablation, specs)])

    lines = table(spec("base", base), spec("better", better))
    row = [x for x in lines if x.startswith("| better |")][0]
    # MLM +6.3 points across 3 seeds: resolved; topics +0.2 points with seed noise of ~0.5: not resolved
    assert "| 3 | 33.3 ± " in row and "+6.3 ± " in row and "| +0.2 ± " in row and row.count("✓") == 1
    single = table(spec("base", base[:1]), spec("better", better[:1]))
    row = [x for x in single if x.startswith("| better |")][0]
    # one run each: MLM 33.0 vs 27.0 on 40,000 tokens (resolved); topics 93.2 vs 93.0 on the same 925 test
    # examples (862 vs 860 correct, the 860 a subset of the 862): +0.2 points, unresolved
    assert "| 1 | 33.0 ± 0.5 | +6.0 ± 0.6 ✓ | 93.2 ± 1.6 | +0.2 ± " in row and row.count("✓") == 1


def test_across_seeds_differences_are_paired_by_seed_where_both_variants_ran_the_same_seeds(tmp_path):
    """Variants trained with the same seeds (recipe.yaml's train.seed) are compared seed by seed: a seed fixes
    the data order and masks, so a difference the seed spread hides in Welch's interval is resolved paired."""
    def run(name, seed, mlm, record_seed=True):
        d = tmp_path / f"{name}-seed{seed}"
        d.mkdir()
        (d / "metrics.jsonl").write_text(json.dumps({"step": 150, "eval/student_mlm_accuracy": mlm,
                                                     "eval/student_tokens": 87_628}) + "\n")
        (d / "recipe.yaml").write_text(f"train:\n  seed: {seed}\n" if record_seed else "train: {}\n")
        return d

    def row(base, other):
        variants = [measure.parse_ablation(f"{n}={'+'.join(map(str, ds))}") for n, ds in (base, other)]
        lines = render.ablation_table([(v.name, measure.variant_metrics(v)) for v in variants])
        return [x for x in lines if x.startswith(f"| {other[0]} |")][0]

    seeds = (56, 57, 58)
    base = ("base", [run("base", s, m) for s, m in zip(seeds, (0.360, 0.366, 0.362))])
    # +0.4, +0.5, +0.3 points on each seed: +0.40 +- 4.30 * 0.1 / sqrt(3) = +- 0.25, paired
    better = ("better", [run("better", s, m) for s, m in zip(seeds, (0.364, 0.371, 0.365))])
    assert "| 3 | 36.7 ± 0.9 | +0.4 ± 0.2 ✓ (paired by seed) | — | — |" in row(base, better)
    # the same values in another order of the spec: still paired seed by seed
    shuffled = ("shuffled", better[1][::-1])
    assert "+0.4 ± 0.2 ✓ (paired by seed)" in row(base, shuffled)
    # other seeds (56, 57, 59), or a run without its seed on record: Welch's interval, which does not resolve it
    other = ("other", [run("other", s, m) for s, m in zip((56, 57, 59), (0.364, 0.371, 0.365))])
    unrecorded = ("unrecorded", [run("unrecorded", s, m, record_seed=s != 58)
                                 for s, m in zip(seeds, (0.364, 0.371, 0.365))])
    for variant in (other, unrecorded):
        cell = row(base, variant).split(" | ")[3]
        assert cell.startswith("+0.4 ± ") and "✓" not in cell and "paired" not in cell
    # a baseline with a seed run twice (56, 57, 58, 58): not one pair per seed, so not paired
    repeated = ("base", [*base[1], run("repeat", 58, 0.362)])
    assert "paired" not in row(repeated, better).split(" | ")[3]


def test_single_run_mlm_differences_are_paired_on_the_same_tokens(tmp_path):
    """heldout.json (per-token correctness + fingerprint of the scored tokens) pairs two single runs token by
    token: a 0.5-point difference on 40,000 tokens is resolved paired, not with two independent binomials."""
    from distill.metrics import MaskedLMScores, pack_correct
    from distill.train import write_heldout

    n = 40_000
    base_correct = torch.zeros(n, dtype=torch.bool)
    base_correct[:10_800] = True  # 27.0 %
    better_correct = base_correct.clone()
    better_correct[10_800:11_000] = True  # 200 more tokens right, none lost: 27.5 %

    def run(name, correct, fingerprint="same-tokens", step=150, finetuned=True):
        d = tmp_path / name
        d.mkdir()
        acc = correct.double().mean().item()
        (d / "metrics.jsonl").write_text(json.dumps({"step": step, "eval/student_mlm_accuracy": acc,
                                                     "eval/student_tokens": n}) + "\n")
        write_heldout(d / "heldout.json", step, MaskedLMScores(correct, 0.0, fingerprint), None)
        spec = f"{name}={d}"
        if finetuned:
            f = tmp_path / f"{name}-ft"
            f.mkdir()
            (f / "results.json").write_text(json.dumps({"test": {"accuracy": 0.93, "correct": [1] * 860 + [0] * 65}}))
            spec += f",{f}"
        return spec

    def row(*specs):
        variants = [measure.parse_ablation(x) for x in specs]
        lines = render.ablation_table([(v.name, measure.variant_metrics(v)) for v in variants])
        return [x for x in lines if x.startswith(f"| {variants[-1].name} |")][0]

    base = run("base", base_correct)
    paired = row(base, run("better", better_correct))
    assert "| 27.5 ± 0.4 | +0.50 ± 0.07 ✓ (paired) |" in paired
    # other tokens (another fingerprint): two binomials, ±0.6 points, unresolved
    unpaired = row(base, run("elsewhere", better_correct, fingerprint="other-tokens"))
    assert "| +0.5 ± 0.6 |" in unpaired and "✓" not in unpaired
    # a heldout.json from another step than the last evaluation is not used
    record = json.loads((tmp_path / "better" / "heldout.json").read_text())
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "metrics.jsonl").write_text(json.dumps({"step": 200, "eval/student_mlm_accuracy": 0.275,
                                                     "eval/student_tokens": n}) + "\n")
    (stale / "heldout.json").write_text(json.dumps(record))  # step 150
    assert "| +0.5 ± 0.6 |" in row(base, f"stale={stale}")
    # a variant distilled but not fine-tuned: held-out MLM only, its topic cells empty
    mlm_only = row(base, run("mlm-only", better_correct, finetuned=False))
    assert mlm_only.endswith("| +0.50 ± 0.07 ✓ (paired) | — | — |")
    assert record["student"]["correct"] == pack_correct(better_correct) and record["tokens"] == n
    # a damaged heldout.json: one line naming the file, not a traceback
    damaged = {"step": 200, "student": {"mlm_accuracy": 0.275, "correct": "%%"}, "tokens": 4}
    (stale / "heldout.json").write_text(json.dumps(damaged))
    (stale / "metrics.jsonl").write_text(json.dumps({"step": 200, "eval/student_mlm_accuracy": 0.275,
                                                     "eval/student_tokens": n}) + "\n")
    with pytest.raises(SystemExit, match=r"stale/heldout.json is damaged .*delete it"):
        row(base, f"stale={stale}")
    (stale / "heldout.json").write_text("{not json")
    with pytest.raises(SystemExit, match=r"stale/heldout.json is damaged"):
        row(base, f"stale={stale}")
    with pytest.raises(SystemExit, match="one fine-tune per distillation run, or none"):
        measure.parse_ablation(f"x={tmp_path / 'base'}+{tmp_path / 'better'},{tmp_path / 'base-ft'}")


REPORT_BAD_INPUTS = {  # id: (what to break, the one line expected)
    "distill-run-not-a-run": ("no-metrics", r"--ablation x: .*empty has no metrics.jsonl: give a distillation run"),
    "finetune-not-finished": ("no-results", r"--ablation x: .*empty has no results.json: give a finished fine-tune"),
    "metrics-line-not-json": ("metrics-garbage", r"metrics.jsonl line 2 is not JSON; repair or remove that line"),
    "metrics-line-not-object": ("metrics-list", r"metrics.jsonl line 1 is not a JSON object"),
    "results-not-json": ("results-garbage", r"results.json is damaged \(JSONDecodeError"),
    "results-no-accuracy": ("results-no-test", r"results.json is damaged \(KeyError: 'test'\); rerun the fine-tune"),
    "results-accuracy-percent": ("results-percent", r"results.json has test accuracy 93.2, not a number in \[0, 1\]"),
    "repeats-zero": ("repeats", r"--repeats must be >= 1, got 0"),
    "output-is-a-file": ("output-file", r"--output .*report-file is a file; give a directory"),
    "distill-run-missing": ("distill-run", r"--distill-run .*no-such-run is not a directory"),
}


@pytest.mark.parametrize("case", list(REPORT_BAD_INPUTS), ids=list(REPORT_BAD_INPUTS))
def test_report_bad_inputs_are_one_line_and_change_nothing(case, tmp_path):
    kind, expected = REPORT_BAD_INPUTS[case]
    d, f, empty = tmp_path / "d", tmp_path / "f", tmp_path / "empty"
    for x in (d, f, empty):
        x.mkdir()
    (d / "metrics.jsonl").write_text(json.dumps({"step": 10, "eval/student_mlm_accuracy": 0.3,
                                                 "eval/student_tokens": 100}) + "\n")
    (f / "results.json").write_text(json.dumps({"test": {"accuracy": 0.932}}))
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.md").write_text("an earlier report\n")
    args = ["--ablation", f"x={d},{f}", "--output", str(out)]
    if kind == "no-metrics":
        args[1] = f"x={empty}"
    elif kind == "no-results":
        args[1] = f"x={d},{empty}"
    elif kind == "metrics-garbage":
        with (d / "metrics.jsonl").open("a") as fh:
            fh.write('{"step": 20, "eval/stu\n')
    elif kind == "metrics-list":
        (d / "metrics.jsonl").write_text("[1, 2]\n")
    elif kind == "results-garbage":
        (f / "results.json").write_text("{")
    elif kind == "results-no-test":
        (f / "results.json").write_text(json.dumps({"best_step": 3}))
    elif kind == "results-percent":
        (f / "results.json").write_text(json.dumps({"test": {"accuracy": 93.2}}))
    elif kind == "repeats":
        args += ["--repeats", "0"]
    elif kind == "output-file":
        (tmp_path / "report-file").write_text("not a directory\n")
        args[-1] = str(tmp_path / "report-file")
    elif kind == "distill-run":
        args = ["--teacher", str(empty), "--student", str(empty), "--distill-run", str(tmp_path / "no-such-run"),
                "--output", str(out)]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as e:
        report.main(args)
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message and re.search(expected, message), message
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


ABLATION_TABLES = {  # the README's tables of the ablation set: a row is (its name, the records of its seeds, and
    # the suffix of their fine-tunes' records: <record><suffix>/results.json, "-topics" unless given, None: none)
    "seed 56": [(v, [v]) for v in ("triple", "triple-seed57", "no-ce", "no-cos", "no-mlm", "random-init",
                                   "reverse-kl", "jsd", "hidden-mse", "hidden-mse-w10", "hidden-mse-w100",
                                   "hidden-mse-w300", "hidden-mse-w1000", "attn-kl", "minilmv2")],
    "seeds 56-58": [(v, [v, f"{v}-seed57", f"{v}-seed58"], None if v == "hidden-mse-w10"
                     else "-topics")  # weight 10: distilled only (held-out MLM)
                    for v in ("triple", "no-ce", "no-cos", "reverse-kl", "jsd", "no-mlm", "hidden-mse",
                              "hidden-mse-w10", "hidden-mse-w100", "hidden-mse-w300", "hidden-mse-w1000", "attn-kl",
                              "minilmv2", "random-init")],
    "hidden-MSE weight, seeds 56-58": [(v, [v, f"{v}-seed57", f"{v}-seed58"])
                                       for v in ("hidden-mse-w100", "hidden-mse-w300", "hidden-mse-w1000")],
    "attention KL, seeds 56-59": [(v, [v, f"{v}-seed57", f"{v}-seed58", f"{v}-seed59"]) for v in ("triple", "attn-kl")],
    "task distillation": [("triple, fine-tuned", ["triple", "triple-seed57", "triple-seed58"]),
                          ("triple, task-distilled", ["triple", "triple-seed57", "triple-seed58"], "-topics-kd")],
}


def ablation_spec(records: Path, name: str, runs: list[str], suffix: str | None = "-topics") -> str:
    """--ablation NAME=D1+D2..[,F1+F2..] for a README row (the fine-tunes where every run has one; none
    where the suffix is None)."""
    topics = [records / f"{v}{suffix}" for v in runs] if suffix else []
    return (f"{name}={'+'.join(str(records / v) for v in runs)}"
            + (f",{'+'.join(map(str, topics))}" if topics and all(t.is_dir() for t in topics) else ""))


def test_the_readme_ablation_tables_are_what_the_committed_records_give(tmp_path):
    """The README's ablation tables are rendered from the runs' records in benchmarks/results/ (metrics.jsonl,
    heldout.json, recipe.yaml; a fine-tune's results.json): their numbers cannot drift from the data, and anyone
    can recompute them."""
    records = ROOT / "benchmarks/results/ablation-cpu-2026-12-01"
    readme = (ROOT / "README.md").read_text().splitlines()

    for table, rows_of in ABLATION_TABLES.items():
        out = tmp_path / table
        specs = [a for row in rows_of for a in ("--ablation", ablation_spec(records, *row))]
        report.main([*specs, "--output", str(out)])
        starts = tuple(f"| {row[0]} |" for row in rows_of)
        rows = [x for x in (out / "report.md").read_text().splitlines() if x.startswith(starts)]
        assert len(rows) == len(rows_of) and all(row in readme for row in rows), table
        # every held-out difference paired: token by token (single runs) or seed by seed (several)
        assert all("(paired" in row for row in rows[1:])
    # every run, of any seed, scored the same tokens (train.eval_seed), with one teacher
    held = [json.loads((d / "heldout.json").read_text()) for d in records.iterdir() if (d / "heldout.json").is_file()]
    assert len(held) == len({v for rows_of in ABLATION_TABLES.values() for row in rows_of for v in row[1]})
    assert len({h["fingerprint"] for h in held}) == 1 and {h["tokens"] for h in held} == {87_628}
    assert len({h["teacher"]["correct"] for h in held}) == 1


# the training masks of scripts/mlm_loss_study.sh: (their masking.smoothing, the loss.alpha_mlm weights run)
MLM_STUDY = {"smoothed": ("0.7", ["0", "0.1", "0.5", "2"]), "uniform": ("0.0", ["0", "2"])}
# every weight above also ran with seeds 57 and 58 (train.seed), for the README's three-seed tables
MLM_STUDY_SEEDS = [56, 57, 58]


def test_the_readme_mlm_loss_study_is_what_its_committed_records_give(tmp_path):
    """The README's L_mlm weight x training-mask tables, the loss shares quoted under them and the masks'
    effect without L_mlm, recomputed from scripts/mlm_loss_study.sh's records."""
    from distill.build import read_saved_recipe

    records = ROOT / "benchmarks/results/mlm-study-cpu-2026-12-05"
    readme = (ROOT / "README.md").read_text()
    lines = readme.splitlines()

    def label(masks, weight):
        return f"{masks}, α_mlm {weight}" + (" (paper)" if weight == "2" else "")

    def rows(out, specs):
        report.main([a for spec in specs for a in ("--ablation", spec)] + ["--output", str(tmp_path / out)])
        return [x for x in (tmp_path / out / "report.md").read_text().splitlines() if x.startswith("| ")][2:]

    def last_losses(run):  # the losses logged at the last step, 100
        last = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss/total" in r][-1]
        assert last["step"] == 100
        return last

    def loss_share(run):  # at step 100: (α_mlm · L_mlm / total, L_mlm), α_mlm from the run's recipe
        last = last_losses(run)
        return read_saved_recipe(run)["loss"]["alpha_mlm"] * last["loss/mlm"] / last["loss/total"], last["loss/mlm"]

    shares = {}
    for masks, (smoothing, weights) in MLM_STUDY.items():
        runs = {w: records / f"alpha-mlm{w}-smoothing{smoothing}-seed56" for w in weights}
        table = rows(masks, [f"{label(masks, w)}={run}" for w, run in runs.items()])
        assert [r.split(" | ")[0] for r in table] == [f"| {label(masks, w)}" for w in weights]
        assert all(r in lines for r in table), masks
        assert all("✓ (paired)" in r for r in table[2:])  # the weights from 0.5 on: resolved, token by token
        for w, run in runs.items():
            recipe = read_saved_recipe(run)
            assert recipe["masking"]["smoothing"] == float(smoothing) and recipe["loss"]["alpha_mlm"] == float(w)
            shares[masks, w] = loss_share(run)

    def pct(x):
        return f"{100 * x:.0f}"

    assert (f"{pct(shares['smoothed', '0.1'][0])} / {pct(shares['smoothed', '0.5'][0])} / "
            f"{pct(shares['smoothed', '2'][0])} % of the total loss") in readme
    assert (f"(L_mlm {shares['smoothed', '0.1'][1]:.2f} / {shares['smoothed', '0.5'][1]:.2f} / "
            f"{shares['smoothed', '2'][1]:.2f} nats) and {pct(shares['uniform', '2'][0])} %") in readme
    assert f"with uniform ones ({shares['uniform', '2'][1]:.2f} nats)" in readme
    # the masks without L_mlm: uniform against smoothed, paired on the same tokens
    (without,) = rows("masks", [f"smoothed={records / 'alpha-mlm0-smoothing0.7-seed56'}",
                                f"uniform={records / 'alpha-mlm0-smoothing0.0-seed56'}"])[1:]
    assert f"at α_mlm 0, is {without.split(' | ')[3]}" in " ".join(lines)
    # three seeds of every weight: each row's Δ paired by seed against the same masks without L_mlm
    seeds = MLM_STUDY_SEEDS
    for masks, (smoothing, weights) in MLM_STUDY.items():
        runs = {w: "+".join(str(records / f"alpha-mlm{w}-smoothing{smoothing}-seed{seed}") for seed in seeds)
                for w in weights}
        table = rows(f"{masks}-seeds", [f"{label(masks, w)}={run}" for w, run in runs.items()])
        assert [r.split(" | ")[1] for r in table] == [str(len(seeds))] * len(weights)
        assert all(r in lines for r in table), masks
        assert all("(paired by seed)" in r for r in table[1:])
        # as the prose concludes: smoothed, 0.1 is indistinguishable from none, 0.5 and 2 resolved; uniform, 2 resolved
        assert ["✓" in r for r in table[1:]] == {"smoothed": [False, True, True], "uniform": [True]}[masks], masks
    (without,) = rows("masks-seeds", [
        f"{masks}={'+'.join(str(records / f'alpha-mlm0-smoothing{smoothing}-seed{seed}') for seed in seeds)}"
        for masks, (smoothing, _) in MLM_STUDY.items()])[1:]
    assert f"at α_mlm 0 over the three seeds, is {without.split(' | ')[3]}" in " ".join(lines)
    # the per-seed accuracies quoted beside the tables (seed 56 / 57 / 58)
    for masks, (smoothing, weights) in MLM_STUDY.items():
        for w in weights:
            accs = [json.loads((records / f"alpha-mlm{w}-smoothing{smoothing}-seed{seed}" / "heldout.json")
                               .read_text())["student"]["mlm_accuracy"] for seed in seeds]
            assert " / ".join(f"{100 * a:.1f}" for a in accs) + " %" in " ".join(lines), (masks, w)
    # the loss shares at step 100 of seeds 57 / 58, weight 2
    share = {}
    for masks, (smoothing, _) in MLM_STUDY.items():
        for seed in seeds[1:]:
            fraction, mlm = loss_share(records / f"alpha-mlm2-smoothing{smoothing}-seed{seed}")
            share[masks, seed] = (pct(fraction), f"{mlm:.2f}")
    smoothed_pct = {share["smoothed", seed][0] for seed in seeds[1:]}
    assert len(smoothed_pct) == 1  # the README quotes one share for both seeds
    assert (f"{smoothed_pct.pop()} % of the loss with smoothed masks (L_mlm "
            f"{share['smoothed', 57][1]} / {share['smoothed', 58][1]} nats) and "
            f"{share['uniform', 57][0]} / {share['uniform', 58][0]} % with uniform ones "
            f"({share['uniform', 57][1]} / {share['uniform', 58][1]} nats)") in " ".join(lines)
    # and at the smoothed weights 0.1 / 0.5 (one share per weight for both seeds)
    low = {w: [loss_share(records / f"alpha-mlm{w}-smoothing0.7-seed{seed}") for seed in seeds[1:]]
           for w in ("0.1", "0.5")}
    low_pct = {w: {pct(fraction) for fraction, _ in seed_shares} for w, seed_shares in low.items()}
    assert all(len(p) == 1 for p in low_pct.values())
    assert (f"at the smoothed weights 0.1 / 0.5 it was {low_pct['0.1'].pop()} / {low_pct['0.5'].pop()} % (L_mlm "
            + " and ".join(" / ".join(f"{mlm:.2f}" for _, mlm in low[w]) for w in ("0.1", "0.5"))
            + " nats)") in " ".join(lines)
    # every run scored the same tokens with the same teacher (its 33.5 % quoted)
    held = [json.loads((d / "heldout.json").read_text()) for d in records.iterdir() if d.is_dir()]
    assert len(held) == sum(len(w) for _, w in MLM_STUDY.values()) * len(seeds) == 18
    assert len({h["fingerprint"] for h in held}) == 1 and {h["tokens"] for h in held} == {25_038}
    assert len({h["teacher"]["correct"] for h in held}) == 1
    assert f"300 steps ({100 * held[0]['teacher']['mlm_accuracy']:.1f} % held-out)" in readme
    assert "the same 25,038 masked tokens for every run" in readme


def pipeline_rows(records: Path, kd_label) -> list[str]:
    """The README rows of a pipeline table (held-out MLM; topics fine-tuned and task-distilled, each with its
    student / teacher ratio) recomputed from a pipeline's records: distill/heldout.json, topics-*/results.json."""
    from distill import stats
    from distill.metrics import unpack_correct

    held = json.loads((records / "distill/heldout.json").read_text())
    correct = {k: unpack_correct(held[k]["correct"], held["tokens"]) for k in ("teacher", "student")}

    def pct(model):
        acc = held[model]["mlm_accuracy"]
        assert acc == pytest.approx(correct[model].double().mean().item(), abs=1e-12)
        return f"{100 * acc:.1f} ± {196 * stats.binomial_se(acc, held['tokens']):.1f} %"

    ratio = report.with_interval(stats.paired_proportion_ratio(correct["student"], correct["teacher"]))
    rows = [f"| held-out masked-token accuracy ({held['tokens']:,} tokens, same masks) | {pct('teacher')} | "
            f"{pct('student')} | {ratio} |"]
    teacher = json.loads((records / "topics-teacher/results.json").read_text())["test"]
    for run_dir in sorted(records.glob("topics-student*")):
        run = json.loads((run_dir / "results.json").read_text())
        assert bool(run["task_distillation_teacher"]) == ("-kd" in run_dir.name)
        label = kd_label(run_dir) if run["task_distillation_teacher"] else "fine-tuned"
        test = run["test"]
        ratio = report.with_interval(stats.paired_bootstrap_ratio(test["correct"], teacher["correct"]))
        rows.append(f"| topic test accuracy, {label} | {teacher['accuracy']:.4f} | {test['accuracy']:.4f} | {ratio} |")
    return rows


def test_the_readme_pipeline_table_is_what_the_committed_records_give():
    """The README's 2026-12-02 pipeline table of the triple-loss recipe, recomputed from its records."""
    readme = (ROOT / "README.md").read_text()
    rows = pipeline_rows(ROOT / "benchmarks/results/pipeline-cpu-2026-12-02", lambda _: "task-distilled student")
    assert len(rows) == 3 and all(row in readme for row in rows), [row for row in rows if row not in readme]


def kd_label(run_dir: Path) -> str:
    distill = resolve(run_dir / "recipe.yaml").distill
    return f"task-distilled, T = {distill.temperature:g}, α_ce = {distill.alpha_ce:g}"


def pipeline_differences(records: Path, before: Path) -> list[str]:
    """The README's lines for one pipeline against another: held-out MLM paired token by token (the runs must
    share the evaluation set), topics by a paired bootstrap over the test articles."""
    from distill import stats

    held = [measure.last_heldout(r / "distill") for r in (records, before)]  # the report's reader of a run
    assert held[0].correct is not None and held[0].fingerprint == held[1].fingerprint
    mlm = stats.paired_proportion_diff(held[0].correct, held[1].correct)
    topics = [json.loads((r / "topics-student/results.json").read_text())["test"]["correct"] for r in (records, before)]
    top = stats.paired_bootstrap_diff(*topics)
    return [f"{what} {100 * d.estimate:+.2f} points (95 % CI {100 * d.low:+.2f} to {100 * d.high:+.2f})"
            for what, d in (("held-out MLM", mlm), ("topics", top))]


def test_the_readme_hidden_mse_pipeline_tables_are_what_the_committed_records_give():
    """The main recipe with hidden-state MSE: its pipeline table (the task distillation at three settings), the
    setting chosen on validation accuracy, and its differences to the triple-loss pipeline, paired."""

    records = ROOT / "benchmarks/results/pipeline-cpu-2026-12-02-hidden-mse"
    before = ROOT / "benchmarks/results/pipeline-cpu-2026-12-02"
    readme = (ROOT / "README.md").read_text()
    assert resolve(records / "distill/recipe.yaml").loss.alpha_hidden_mse == 100.0
    rows = pipeline_rows(records, kd_label)
    assert len(rows) == 5 and all(row in readme for row in rows), [row for row in rows if row not in readme]
    # the task-distillation setting is chosen on validation accuracy (ties: the recipe's own, listed first)
    kd = sorted(records.glob("topics-student-kd*"), key=lambda d: (d.name != "topics-student-kd", d.name))
    val = {d: json.loads((d / "results.json").read_text())["validation"]["accuracy"] for d in kd}
    chosen = max(kd, key=lambda d: val[d])
    assert f"chosen on validation accuracy: {kd_label(chosen)} ({100 * val[chosen]:.2f} %" in readme
    # against the triple-loss pipeline: held-out MLM paired token by token (same evaluation set), topics paired
    for line in pipeline_differences(records, before):
        assert line in readme, line


def test_the_readme_main_recipe_pipeline_table_is_what_the_committed_records_give():
    """The main recipe as it stands (hidden-state MSE at weight 300): its pipeline table, recomputed from its
    records, and its differences to the weight-100 pipeline, paired (same evaluation tokens, same teacher,
    same fine-tune seed)."""

    records = ROOT / "benchmarks/results/pipeline-cpu-2026-12-02-hidden-mse300"
    before = ROOT / "benchmarks/results/pipeline-cpu-2026-12-02-hidden-mse"
    readme = (ROOT / "README.md").read_text()
    recipe = resolve(records / "distill/recipe.yaml")
    assert recipe.loss.alpha_hidden_mse == resolve(ROOT / "recipes/wiki.yaml").loss.alpha_hidden_mse == 300.0
    rows = pipeline_rows(records, kd_label)
    assert len(rows) == 2 and all(row in readme for row in rows), [row for row in rows if row not in readme]
    teachers = [json.loads((r / "distill/heldout.json").read_text())["teacher"]["correct"] for r in (records, before)]
    assert teachers[0] == teachers[1]  # one teacher: every token scored alike
    for line in pipeline_differences(records, before):
        assert f"against weight 100, {line}" in readme, line
