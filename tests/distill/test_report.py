import json

import pytest

from distill import report
from distill.finetune import finetune
from distill.recipes import resolve
from distill.train import train
from tests.distill.test_train import ROOT, recipe

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
                 "--ablation", f"triple={tmp_path / 'distill'},{tmp_path / 'student'}", "--wandb", "kit-tests"])
    md = (out / "report.md").read_text()
    for row in ("parameters", "CPU latency, batch 1", "held-out masked-token accuracy", "downstream test accuracy",
                "## Ablation", "| triple |"):
        assert row in md
    summary = json.loads((out / "report.json").read_text())
    assert summary["parameters"]["student"] < summary["parameters"]["teacher"]
    lat = summary["latency_ms"]["student"]
    assert set(lat) == {"1", "32"} and all(v["median"] > 0 and v["iqr"] >= 0 and v["blocks"] >= 2 for v in lat.values())
    assert "median (IQR)" in md
    for png in ("training_curves.png", "confusion_student.png", "confusion_teacher.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same report in wandb: table, figures as images, grouped with the distillation run
    assert logged["init"]["project"] == "kit-tests" and logged["init"]["group"] == "distill"
    assert logged["init"]["job_type"] == "report" and logged["finished"]
    assert isinstance(logged["report/table"], wandb.Table) and isinstance(logged["report/training_curves"], wandb.Image)
    assert isinstance(logged["report/confusion_student"], wandb.Image)
