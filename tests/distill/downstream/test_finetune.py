"""Fine-tuning recipes end to end on a tiny student and a slice of the offline topic task."""

import json
from pathlib import Path

import pytest
import transformers
from transformers import DistilBertConfig

from distill.downstream.tasks import load_classification
from distill.recipe_loader import resolve
from distill.recipes import TaskConfig
from students import DistilBERTForMaskedLM
from tests.cli import ROOT, kit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("student")
    DistilBERTForMaskedLM(DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_wiki_topics_split_is_deterministic_disjoint_and_counted():
    data = load_classification(TaskConfig())
    assert len(data.label_names) == 11 and "Uncategorized" not in data.label_names
    sizes = {k: len(v) for k, v in data.splits.items()}
    assert sum(sizes.values()) == 10033 - 1000
    assert 0.75 < sizes["train"] / sum(sizes.values()) < 0.85
    texts = {k: set(v["text"]) for k, v in data.splits.items()}
    assert not texts["train"] & texts["test"] and not texts["validation"] & texts["test"]
    again = load_classification(TaskConfig())
    assert again.splits["test"]["text"] == data.splits["test"]["text"]
    assert sum(data.stats["train"]["class_counts"].values()) == sizes["train"]


def test_finetune_recipe_end_to_end(tiny_student, tmp_path):
    out = tmp_path / "ft"
    proc = kit("recipes/finetune/wiki-topics.yaml", f"model={tiny_student}", f"output_dir={out}",
               "task.max_train_examples=96", "task.max_length=32", "train.epochs=2", "train.batch_size=16",
               "train.eval_every=3", "train.patience=1", "tracking.wandb=false")
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["test"]["accuracy"] <= 1 and len(results["test"]["confusion_matrix"]) == 11
    assert results["best_step"] in [h["step"] for h in results["history"]]
    clf = transformers.AutoModelForSequenceClassification.from_pretrained(out)  # the best model, at output_dir
    assert clf.config.num_labels == 11 and clf.config.id2label[0] == results["label_names"][0]
    assert not (out / ".best").exists() and json.loads(proc.stdout)["export"] == str(out)
    card = (out / "README.md").read_text()  # the model card, with the run's test numbers
    assert "pipeline_tag: text-classification" in card and f"{100 * results['test']['accuracy']:.1f} %" in card
    # the 96 training examples are a stratified subset: every one of the 11 topics is in it
    assert len(results["data"]["train"]["class_counts"]) == 11 and results["data"]["train"]["examples"] == 96


def test_task_distillation_recipe_resolves(tmp_path):
    r = resolve(ROOT / "recipes/finetune/wiki-topics.yaml", ["distill.teacher=runs/teacher-ft",
                                                               "task.splits={train: a.jsonl, test: b.jsonl}"])
    assert r.kind == "finetune" and r.distill.teacher == "runs/teacher-ft"
    assert r.task.splits == {"train": "a.jsonl", "test": "b.jsonl"}
    kd = resolve(ROOT / "recipes/finetune/wiki-topics-distill.yaml")  # the paper's second step, offline
    plain = resolve(ROOT / "recipes/finetune/wiki-topics.yaml")
    assert kd.distill.teacher == "runs/topics/teacher" and kd.task == plain.task and kd.train == plain.train
    assert Path(ROOT / "recipes/finetune/sst2.yaml").exists()


def test_task_specific_distillation_from_a_finetuned_teacher(tiny_teacher_dir, tiny_student, tmp_path):
    from distill.downstream.finetune import finetune

    common = ["task.max_train_examples=48", "task.max_length=32", "train.epochs=1", "train.batch_size=16",
              "train.log_every=1", "tracking.wandb=false"]
    finetune(resolve(ROOT / "recipes/finetune/wiki-topics.yaml",
                     [f"model={tiny_teacher_dir}", f"output_dir={tmp_path / 't'}", *common]))

    def student(out, *extra):
        finetune(resolve(ROOT / "recipes/finetune/wiki-topics.yaml",
                         [f"model={tiny_student}", f"output_dir={tmp_path / out}", *common, *extra]))
        rows = [json.loads(x) for x in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        return json.loads((tmp_path / out / "results.json").read_text()), [r for r in rows if "loss/train" in r]

    results, rows = student("s", f"distill.teacher={tmp_path / 't'}", "distill.alpha_ce=0.7", "distill.alpha_task=0.3")
    assert results["task_distillation_teacher"] == str(tmp_path / "t")
    assert 0 <= results["test"]["accuracy"] <= 1 and len(rows) == 3
    for r in rows:  # the logged total is the weighted sum of the two logged terms
        assert r["loss/kd"] > 0
        assert r["loss/train"] == pytest.approx(0.3 * r["loss/task"] + 0.7 * r["loss/kd"], rel=1e-5)
    # with the soft-target weight at 0 the teacher changes nothing: the same run as plain fine-tuning
    plain, plain_rows = student("plain")
    off, off_rows = student("off", f"distill.teacher={tmp_path / 't'}", "distill.alpha_ce=0", "distill.alpha_task=1")
    assert [r["loss/train"] for r in off_rows] == [r["loss/train"] for r in plain_rows]
    assert off["test"]["correct"] == plain["test"]["correct"] and "loss/task" not in plain_rows[0]


def test_a_finished_finetune_is_refused_and_replaced_only_with_overwrite(tiny_student, tmp_path):
    from distill import rundir
    from distill.downstream.finetune import finetune

    out = tmp_path / "ft"
    overrides = [f"model={tiny_student}", f"output_dir={out}", "task.max_train_examples=32", "task.max_length=32",
                 "train.epochs=1", "train.batch_size=16", "train.log_every=1", "tracking.wandb=false"]
    recipe = resolve(ROOT / "recipes/finetune/wiki-topics.yaml", overrides)
    # an unfinished attempt of the same recipe (killed before its results): started again, its records dropped
    out.mkdir()
    (out / "recipe.yaml").write_text(recipe.to_yaml().replace("mixed_precision: null", "mixed_precision: 'no'"))
    (out / "metrics.jsonl").write_text('{"step": 999, "loss/train": 9.0}\n')
    (out / ".best").mkdir()
    finetune(recipe)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert 999 not in steps and steps == sorted(steps) and (out / "results.json").exists()
    first = (out / "results.json").read_bytes()
    with pytest.raises(rundir.RunDirError, match="holds a finished fine-tune"):
        finetune(resolve(ROOT / "recipes/finetune/wiki-topics.yaml", overrides))
    assert (out / "results.json").read_bytes() == first
    (out / "confusion_old.png").write_bytes(b"stale")  # an earlier run's file: --overwrite removes it
    finetune(resolve(ROOT / "recipes/finetune/wiki-topics.yaml", [*overrides, "train.seed=7"]), overwrite=True)
    again = json.loads((out / "results.json").read_text())
    assert not (out / "confusion_old.png").exists() and not (out / ".lock").exists()
    assert resolve(ROOT / "recipes/finetune/wiki-topics.yaml", [*overrides, "train.seed=7"]).train.seed == 7
    assert again["steps"] == 2 and (out / "recipe.yaml").read_text().count("seed: 7") == 1


@pytest.mark.parametrize("n", [5, 11, 40, 200])
def test_stratified_subset_keeps_every_class_and_the_proportions(n):
    from collections import Counter

    from distill.downstream.tasks import stratified_indices

    labels = [0] * 500 + [1] * 300 + [2] * 150 + [3] * 40 + [4] * 10
    keep = stratified_indices(labels, n, seed=3)
    assert len(keep) == n == len(set(keep)) and keep == sorted(keep)
    got = Counter(labels[i] for i in keep)
    if n >= 5:
        assert set(got) == {0, 1, 2, 3, 4}
    for c, size in Counter(labels).items():
        assert abs(got[c] - n * size / len(labels)) <= 1.0 + (n < 20)
    assert stratified_indices(labels, n, seed=3) == keep and stratified_indices(labels, n, seed=4) != keep


class FakeRun:
    """What the trainers hand to wandb, recorded (the real wandb run is replaced; nothing is uploaded)."""

    def __init__(self):
        self.config_updates, self.summary, self.logged, self.artifacts = [], {}, [], []

        class Config:
            def update(inner, values, allow_val_change=False):
                self.config_updates.append(values)

        self.config = Config()

    def log(self, payload, step=None):
        self.logged.append(payload)

    def log_artifact(self, artifact):
        self.artifacts.append(artifact)


def test_finetune_logs_test_tables_summary_group_and_model_to_wandb(tiny_student, tmp_path, monkeypatch):
    import wandb

    from distill import tracking
    from distill.downstream.finetune import finetune

    run = FakeRun()
    monkeypatch.setattr(tracking, "run_of", lambda accelerator: run)
    out = tmp_path / "ft"
    finetune(resolve(ROOT / "recipes/finetune/wiki-topics.yaml", [
        f"model={tiny_student}", f"output_dir={out}", "task.max_train_examples=32", "task.max_length=32",
        "train.epochs=1", "train.batch_size=16", "tracking.wandb=false", "tracking.log_model=true"]))
    results = json.loads((out / "results.json").read_text())
    assert run.summary["test/accuracy"] == results["test"]["accuracy"] and "best_step" in run.summary
    (tables,) = [p for p in run.logged if "test/per_class" in p]
    assert isinstance(tables["test/per_class"], wandb.Table) and len(tables["test/per_class"].data) == 11
    assert tables["test/confusion_matrix"].columns == ["true", *results["label_names"]]
    assert isinstance(tables["test/confusion_matrix_figure"], wandb.Image)
    (artifact,) = run.artifacts
    names = {e.path for e in artifact.manifest.entries.values()}
    assert artifact.type == "model" and "model.safetensors" in names and "config.json" in names
    assert not any(n.startswith("wandb") or n == "metrics.jsonl" for n in names)


def test_wandb_group_links_a_distillation_and_its_finetunes(tmp_path):
    from distill.recipes import TrackingConfig
    from distill.tracking import group_of

    run = tmp_path / "wiki"
    (run / "student").mkdir(parents=True)
    (run / "recipe.yaml").write_text("tracking:\n  group: null\n")
    assert group_of(TrackingConfig(), run) == "wiki"  # the distillation itself
    assert group_of(TrackingConfig(), tmp_path / "ft", str(run / "student")) == "wiki"  # a fine-tune of its export
    assert group_of(TrackingConfig(), tmp_path / "ft", str(run / "teacher")) == "wiki"
    (run / "recipe.yaml").write_text("tracking:\n  group: paper-repro\n")
    assert group_of(TrackingConfig(), tmp_path / "ft", str(run / "student")) == "paper-repro"
    assert group_of(TrackingConfig(group="mine"), tmp_path / "ft", str(run / "student")) == "mine"
    assert group_of(TrackingConfig(), tmp_path / "ft", "bert-base-uncased") == "ft"
