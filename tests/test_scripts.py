"""The experiment scripts' orchestration, with a stand-in interpreter that records each command and writes what
the real command would leave behind (a student export, a fine-tune's results.json)."""

import os
import subprocess

from tests.cli import ROOT

RECORDER = """#!/usr/bin/env bash
echo "${OMP_NUM_THREADS:+threads=$OMP_NUM_THREADS }$*" >> "$COMMANDS"
out=
for a in "$@"; do case $a in output_dir=*) out=${a#output_dir=};; esac; done
[ -n "$out" ] || exit 0
case "$1 $2" in
  "distill/run.py recipes/finetune/"*) mkdir -p "$out" && echo '{}' > "$out/results.json";;
  "distill/run.py "*) mkdir -p "$out/student";;
esac
"""


def script(tmp_path, name, **env):
    python = tmp_path / "python"
    python.write_text(RECORDER)
    python.chmod(0o755)
    log = tmp_path / "commands.txt"
    log.unlink(missing_ok=True)
    subprocess.run(["bash", f"scripts/{name}"], cwd=ROOT, check=True, timeout=60,
                   env={**os.environ, "OMP_NUM_THREADS": "", "PYTHON": str(python), "COMMANDS": str(log), **env})
    return log.read_text().splitlines()


def ablation(tmp_path, **env):
    return script(tmp_path, "ablation.sh", **env)


def test_ablation_runs_every_variant_and_seed_once_then_reports(tmp_path):
    runs = tmp_path / "runs"
    env = {"VARIANTS": "triple jsd", "SEEDS": "56 57", "EPOCHS": "2", "RUNS": str(runs)}
    commands = ablation(tmp_path, **env)
    pairs = [(v, s) for v in ("triple", "jsd") for s in (56, 57)]
    distil = [c for c in commands if c.startswith("distill/run.py recipes/ablation/")]
    assert distil == [f"distill/run.py recipes/ablation/{v}.yaml output_dir={runs}/{v}-seed{s} train.seed={s}"
                      for v, s in pairs]
    tune = "distill/run.py recipes/finetune/wiki-topics.yaml train.epochs=2"
    tunes = [c for c in commands if c.startswith("distill/run.py recipes/finetune/")]
    assert tunes == [f"{tune} model={runs}/{v}-seed{s}/student output_dir={runs}/{v}-seed{s}-topics train.seed={s}"
                     for v, s in pairs] + [f"{tune} model={runs}/triple-seed56/teacher "
                                           f"output_dir={runs}/teacher-topics"]
    base = f"{runs}/triple-seed56"
    spec = {v: f"{v}={runs}/{v}-seed56+{runs}/{v}-seed57,{runs}/{v}-seed56-topics+{runs}/{v}-seed57-topics"
            for v in ("triple", "jsd")}
    assert commands[-1] == (f"-m distill.downstream.report --teacher {base}/teacher --student {base}/student "
                            f"--distill-run {base} --teacher-finetune {runs}/teacher-topics --student-finetune "
                            f"{base}-topics --ablation {spec['triple']} --ablation {spec['jsd']} "
                            f"--output {runs}/report")
    assert len(commands) == len(distil) + len(tunes) + 1
    # finished runs are kept and skipped: a second call only reports
    assert ablation(tmp_path, **env) == [commands[-1]]


def test_ablation_without_fine_tunes_and_with_the_recipes_epochs(tmp_path):
    runs = tmp_path / "runs"
    commands = ablation(tmp_path, VARIANTS="no-mlm", FINETUNE="0", RUNS=str(runs))
    assert commands[0] == f"distill/run.py recipes/ablation/no-mlm.yaml output_dir={runs}/no-mlm-seed56 train.seed=56"
    assert commands[-1].endswith(f"--distill-run {runs}/no-mlm-seed56 --ablation no-mlm={runs}/no-mlm-seed56 "
                                 f"--output {runs}/report")
    assert len(commands) == 2
    commands = ablation(tmp_path, VARIANTS="no-mlm", RUNS=str(runs))
    assert commands[:2] == [f"distill/run.py recipes/finetune/wiki-topics.yaml model={runs}/no-mlm-seed56/student "
                            f"output_dir={runs}/no-mlm-seed56-topics train.seed=56",
                            f"distill/run.py recipes/finetune/wiki-topics.yaml model={runs}/no-mlm-seed56/teacher "
                            f"output_dir={runs}/teacher-topics"]


def test_mlm_loss_study_adapts_once_then_runs_the_grid_in_parallel_and_reports_each_masking(tmp_path):
    runs = tmp_path / "runs"
    env = {"WEIGHTS": "0 2", "SMOOTHINGS": "0.7 0.0", "SEEDS": "56 57", "JOBS": "2", "RUNS": str(runs),
           "STEPS": "7", "ADAPT": "9"}
    commands = script(tmp_path, "mlm_loss_study.sh", **env)
    assert commands[0] == "distill/run.py recipes/ablation/triple.yaml --adapt-only teacher.adapt.steps=9"
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    common = ("teacher.adapt.steps=9 train.max_steps=7 train.eval_every=7 train.save_every=7 "
              "train.eval_mask_draws=8 tracking.tags=[mlm-study]")
    grid = [(s, w, seed) for seed in (56, 57) for s in ("0.7", "0.0") for w in ("0", "2")]
    # two at a time, so the order within a pair is not fixed
    assert sorted(commands[1:9]) == sorted(
        f"threads={threads} distill/run.py recipes/ablation/triple.yaml "
        f"output_dir={runs}/alpha-mlm{w}-smoothing{s}-seed{seed} masking.smoothing={s} loss.alpha_mlm={w} "
        f"train.seed={seed} {common}" for s, w, seed in grid)
    # each weight's runs of all seeds form one report row, against the runs without L_mlm
    assert commands[9:] == [
        f"-m distill.downstream.report "
        f"--ablation alpha-mlm-0={runs}/alpha-mlm0-smoothing{s}-seed56+{runs}/alpha-mlm0-smoothing{s}-seed57 "
        f"--ablation alpha-mlm-2={runs}/alpha-mlm2-smoothing{s}-seed56+{runs}/alpha-mlm2-smoothing{s}-seed57 "
        f"--output {runs}/report-smoothing{s}"
        for s in ("0.7", "0.0")] + ["-"]
    # finished runs are skipped: a second call adapts (a cache hit) and reports only
    again = script(tmp_path, "mlm_loss_study.sh", **env)
    assert again == [commands[0]] + commands[9:]
