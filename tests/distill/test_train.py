"""End-to-end tests of the distiller on tiny random models and a slice of the offline corpus."""

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from distill import step as step_mod
from distill import train as train_mod
from distill.metrics import unpack_correct
from distill.recipe_loader import resolve
from tests.cli import ROOT, TINY, kit, launch, python

pytestmark = pytest.mark.slow


def recipe(teacher, out, *overrides):
    return resolve(TINY, [f"teacher.name_or_path={teacher}", f"output_dir={out}", *overrides])


def weights(run_dir, step):
    return load_file(str(Path(run_dir) / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


def losses(run_dir):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss/total"] for r in rows if "loss/total" in r}


def test_command_line_end_to_end_exports_a_transformers_model(tiny_teacher_dir, tmp_path):
    out = tmp_path / "run"
    proc = kit(TINY, f"teacher.name_or_path={tiny_teacher_dir}", f"output_dir={out}", "train.max_steps=4",
               "train.peak_tflops=0.5")
    (line,) = proc.stdout.strip().splitlines()  # stdout: the summary only; messages and bars go to stderr
    summary = json.loads(line)
    assert summary["step"] == 4 and 0 <= summary["student"]["mlm_accuracy"] <= 1
    assert "step 3: student" in proc.stderr  # the evaluation line
    assert "INFO accelerate" not in proc.stderr and "Loading weights" not in proc.stderr  # library chatter off
    export = out / "student"
    model = transformers.AutoModelForMaskedLM.from_pretrained(export)
    assert isinstance(model, transformers.DistilBertForMaskedLM) and model.config.n_layers == 2
    fill = transformers.pipeline("fill-mask", model=str(export), tokenizer=str(export), device="cpu")
    assert len(fill("the capital of france is [MASK].")) == 5
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/student_mlm_accuracy" in r for r in records)
    # Throughput and MFU: model FLOPs of the step over its time; MFU against the recipe's peak (CPU: no table).
    speed = [r for r in records if "loss/total" in r]
    assert speed and all(r["tokens_per_s"] > 0 and r["tflops"] > 0 for r in speed)
    assert all(r["mfu"] == pytest.approx(r["tflops"] / 0.5) for r in speed)
    assert (out / "recipe.yaml").exists()
    # the last evaluation token by token, for paired comparisons between runs: it is the last eval record's,
    # and the teacher's baseline on the same tokens
    last = [r for r in records if "eval/student_mlm_accuracy" in r][-1]
    held = json.loads((out / "heldout.json").read_text())
    assert held["step"] == 4 == last["step"] and held["tokens"] == last["eval/student_tokens"] > 0
    for name in ("student", "teacher"):
        correct = unpack_correct(held[name]["correct"], held["tokens"])
        assert correct.double().mean().item() == pytest.approx(last[f"eval/{name}_mlm_accuracy"])
        assert held[name]["mlm_accuracy"] == last[f"eval/{name}_mlm_accuracy"]
    assert len(held["fingerprint"]) == 64


def interrupt_at(monkeypatch, call: int) -> None:
    """Send this process SIGTERM during the `call`-th teacher forward (as a scheduler or Ctrl-C would)."""
    real = step_mod.teacher_outputs
    calls = []

    def signalling(*a, **k):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(step_mod, "teacher_outputs", signalling)


def test_resume_is_exact(tiny_teacher_dir, tmp_path, monkeypatch):
    # grad_accum 2 and dropout on: the data position and the RNG states must both be restored. With the
    # main recipe's hidden-state MSE on top of the triple loss (and the logits MSE).
    common = ["train.max_steps=6", "train.grad_accum=2", "train.save_every=100", "train.eval_every=100",
              "loss.alpha_mse=0.5", "loss.alpha_hidden_mse=1.0"]
    train_mod.train(recipe(tiny_teacher_dir, tmp_path / "a", *common))
    interrupt_at(monkeypatch, call=5)  # during step 3 (two micro-batches per step)
    with pytest.raises(SystemExit):
        train_mod.train(recipe(tiny_teacher_dir, tmp_path / "b", *common))
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()] == ["step-00000003"]
    train_mod.train(recipe(tiny_teacher_dir, tmp_path / "b", *common))
    a, b = weights(tmp_path / "a", 6), weights(tmp_path / "b", 6)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    assert not torch.equal(a["student.distilbert.embeddings.LayerNorm.weight"],
                           weights(tmp_path / "b", 3)["student.distilbert.embeddings.LayerNorm.weight"])
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert la[6] == pytest.approx(lb[6], rel=1e-6)


def test_resume_refuses_a_different_recipe(tiny_teacher_dir, tmp_path):
    train_mod.train(recipe(tiny_teacher_dir, tmp_path / "r", "train.max_steps=3"))
    with pytest.raises(ValueError, match="different recipe.*train.lr"):
        train_mod.train(recipe(tiny_teacher_dir, tmp_path / "r", "train.max_steps=6", "train.lr=1e-3"))


def test_runs_of_other_training_seeds_score_the_same_held_out_tokens(tiny_teacher_dir, tmp_path):
    """The held-out set follows train.eval_seed, not train.seed: students of two training seeds are scored on
    the same tokens (equal fingerprints), so their difference pairs token by token; another eval_seed is
    another set."""
    def held(name, *overrides):
        out = tmp_path / name
        train_mod.train(recipe(tiny_teacher_dir, out, "train.max_steps=2", "train.log_every=1", *overrides))
        return json.loads((out / "heldout.json").read_text()), losses(out)

    (a, loss_a), (b, loss_b) = held("seed1", "train.seed=1"), held("seed2", "train.seed=2")
    assert loss_a[1] != loss_b[1]  # the seeds did train differently
    assert a["fingerprint"] == b["fingerprint"] and a["tokens"] == b["tokens"] > 0
    assert a["teacher"]["correct"] == b["teacher"]["correct"]
    other, _ = held("eval3", "train.seed=1", "train.eval_seed=3")
    assert other["fingerprint"] != a["fingerprint"]


def test_two_process_ddp_matches_one_process(tiny_teacher_dir, tmp_path):
    args = [str(TINY), f"teacher.name_or_path={tiny_teacher_dir}", "train.max_steps=4", "train.log_every=1",
            "student.dropout=0.0", "train.eval_every=100", "loss.alpha_hidden_mse=1.0"]  # the main recipe's losses
    one = tmp_path / "one"
    two = tmp_path / "two"
    kit(*args, f"output_dir={one}")
    launch("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", "29533", "distill/run.py", *args, f"output_dir={two}")
    # Two processes really ran: each saved its own RNG state.
    assert {p.name for p in (two / "checkpoints" / "step-00000004").glob("rng-*.safetensors")} == {
        "rng-0.safetensors", "rng-1.safetensors"}
    l1, l2 = losses(one), losses(two)
    assert sorted(l1) == sorted(l2) == [1, 2, 3, 4]
    for s in l1:
        assert l2[s] == pytest.approx(l1[s], rel=1e-4), (s, l1, l2)
    w1, w2 = weights(one, 4), weights(two, 4)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-4, rtol=1e-4, msg=k)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_teacher_dir, tmp_path, monkeypatch):
    real = step_mod.fused_vocab_losses
    calls = []

    def poisoned(*a, **k):
        calls.append(1)
        total, *rest = real(*a, **k)
        return (total * float("nan") if len(calls) == 5 else total), *rest

    monkeypatch.setattr(step_mod, "fused_vocab_losses", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 5.*step-00000003"):
        train_mod.train(recipe(tiny_teacher_dir, tmp_path / "nan", "train.max_steps=6"))
    ckpts = sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir())
    assert ckpts == ["step-00000003"]
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "nan", 3).values())


def test_sigterm_saves_a_checkpoint_then_exits(tiny_teacher_dir, tmp_path, monkeypatch):
    interrupt_at(monkeypatch, call=2)
    with pytest.raises(SystemExit) as e:
        train_mod.train(recipe(tiny_teacher_dir, tmp_path / "sig", "train.max_steps=6", "train.save_every=100"))
    assert e.value.code == 128 + signal.SIGTERM
    state = json.loads((tmp_path / "sig" / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert state["step"] == 2


@pytest.mark.parametrize("override,message", [
    ("train.batch_sise=3", "unknown recipe key 'train.batch_sise'; did you mean 'batch_size'"),
    ("teacher.name_or_path=./missing-teacher", "directory not found"),
    ("data.files=[nope.jsonl]", "data.source"),
])
def test_bad_input_is_one_line_and_nonzero(tmp_path, override, message):
    args = [TINY, override, f"output_dir={tmp_path / 'x'}"]
    if override.startswith("data.files"):
        args += ["data.source=files", "teacher.name_or_path=./missing-teacher"]
        message = "nope.jsonl"
    proc = kit(*args, check=False, timeout=300)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_wandb_offline_run_and_lazy_import(tiny_teacher_dir, tmp_path):
    code = (
        "import sys\n"
        "from distill.recipe_loader import resolve\n"
        "from distill.train import train\n"
        f"r = resolve({str(TINY)!r}, ['teacher.name_or_path={tiny_teacher_dir}', 'output_dir={tmp_path / 'w'}',\n"
        "    'train.max_steps=2', 'tracking.wandb=' + sys.argv[1]])\n"
        "train(r)\n"
        "print('WANDB_IMPORTED', 'wandb' in sys.modules)\n"
    )
    off = python("-c", code, "false", WANDB_MODE="offline")
    assert "WANDB_IMPORTED False" in off.stdout
    on = python("-c", code, "true", WANDB_MODE="offline", WANDB_SILENT="true")
    assert "WANDB_IMPORTED True" in on.stdout
    runs = list((tmp_path / "w" / "wandb").glob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())


def test_intermediate_losses_and_bf16(tiny_teacher_dir, tmp_path):
    # TinyBERT/MiniLM-style objectives through the loop, under bf16 autocast on CPU. A fresh process:
    # Accelerate's state (mixed precision) is fixed per process.
    out = tmp_path / "mid"
    kit(TINY, f"teacher.name_or_path={tiny_teacher_dir}", f"output_dir={out}", "train.max_steps=2",
        "train.log_every=1", "loss.alpha_hidden_mse=1.0", "loss.alpha_attn=1.0", "loss.alpha_mse=0.1",
        "loss.layer_map=[[0, 0], [1, 2], [2, 4]]", "train.mixed_precision=bf16")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "loss/total" in x]
    assert rows and all(r["loss/hidden_mse"] > 0 and r["loss/attn"] > 0 and r["loss/mse"] > 0 for r in rows)
    assert all(math.isfinite(r["loss/total"]) for r in rows)


def test_adapt_only_adapts_once_then_reuses_and_refuses_zero_steps(tiny_teacher_dir, tmp_path):
    args = [TINY, "--adapt-only", f"teacher.name_or_path={tiny_teacher_dir}", f"output_dir={tmp_path / 'run'}",
            "teacher.adapt.steps=2", "teacher.adapt.batch_size=4", "teacher.adapt.eval_batches=1"]
    cache = str(tmp_path / "cache")
    first = kit(*args, DISTILBERT_KIT_CACHE=cache)
    report = json.loads(first.stdout.strip().splitlines()[-1])
    adapted = Path(report["adapted_teacher"])
    assert adapted.parent == tmp_path / "cache" / "teachers" and report["steps"] == 2
    assert (adapted / "model.safetensors").exists() and not (tmp_path / "run" / "checkpoints").exists()
    again = kit(*args, DISTILBERT_KIT_CACHE=cache)
    assert "reusing adapted teacher" in again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1]) == report
    zero = kit(*args, "teacher.adapt.steps=0", check=False, DISTILBERT_KIT_CACHE=cache)
    assert zero.returncode == 2 and zero.stderr.strip().splitlines()[-1].startswith("error:")
    assert "teacher.adapt.steps is 0" in zero.stderr


def test_student_preset_of_another_width_than_the_teacher_is_refused(tiny_teacher_dir, tmp_path):
    proc = kit(TINY, f"teacher.name_or_path={tiny_teacher_dir}", f"output_dir={tmp_path / 'run'}",
               "student.preset=minilm-l6-h384", check=False, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "(384 wide, 12 heads) cannot be initialised from the teacher (32 wide" in last


@pytest.fixture
def fresh_accelerate():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("recipe_sets,launcher,expected", [(None, "bf16", "bf16"), ("no", "bf16", "no"),
                                                           (None, None, "no"), ("bf16", None, "bf16")])
def test_precision_comes_from_accelerate_unless_the_recipe_sets_it(tiny_teacher_dir, tmp_path, monkeypatch, caplog,
                                                                   fresh_accelerate, recipe_sets, launcher, expected):
    if launcher:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)  # what `accelerate launch --mixed_precision` sets
    else:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    seen = []
    real = step_mod.DistillationModel.forward

    def spying(self, *a, **k):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
        return real(self, *a, **k)

    monkeypatch.setattr(step_mod.DistillationModel, "forward", spying)
    extra = [] if recipe_sets is None else [f"train.mixed_precision={recipe_sets}"]
    out = tmp_path / "p"
    train_mod.train(recipe(tiny_teacher_dir, out, "train.max_steps=1", *extra))
    assert seen and set(seen) == {torch.bfloat16 if expected == "bf16" else torch.float32}
    import yaml

    assert yaml.safe_load((out / "recipe.yaml").read_text())["train"]["mixed_precision"] == expected
    overridden = [r for r in caplog.records if "overrides Accelerate's" in r.getMessage()]
    assert len(overridden) == (1 if recipe_sets == "no" and launcher == "bf16" else 0)


def test_accelerate_launch_precision_flag_is_used(tiny_teacher_dir, tmp_path):
    out = tmp_path / "launched"
    launch("--num_processes", "1", "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
           "distill/run.py", TINY, f"teacher.name_or_path={tiny_teacher_dir}", f"output_dir={out}", "train.max_steps=1")
    assert "mixed_precision: bf16" in (out / "recipe.yaml").read_text()


def test_the_offline_hint_only_when_offline_was_our_choice(tmp_path, monkeypatch, caplog):
    from distill import tracking
    from distill.recipes import TrackingConfig

    class Run:
        id = "abc"

    class FakeAccelerator:
        log_with = ["wandb"]
        is_main_process = True

        def init_trackers(self, *a, **k):
            self.kwargs = k

        def get_tracker(self, *a, **k):
            return Run()

    monkeypatch.setattr(tracking, "wandb_logged_in", lambda: False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    tracking.start(FakeAccelerator(), TrackingConfig(), tmp_path, {}, None)
    assert not [r for r in caplog.records if "no API key" in r.getMessage()]
    monkeypatch.delenv("WANDB_MODE")
    fake = FakeAccelerator()
    tracking.start(fake, TrackingConfig(), tmp_path, {}, None)
    assert fake.kwargs["init_kwargs"]["wandb"]["mode"] == "offline"
    assert len([r for r in caplog.records if "no API key" in r.getMessage()]) == 1


def test_distillation_logs_baseline_corpus_summary_and_model_to_wandb(tiny_teacher_dir, tmp_path, monkeypatch):
    from distill import tracking
    from tests.distill.downstream.test_finetune import FakeRun

    run = FakeRun()
    monkeypatch.setattr(tracking, "run_of", lambda accelerator: run)
    summary = train_mod.train(recipe(tiny_teacher_dir, tmp_path / "w", "train.max_steps=2", "tracking.log_model=true"))
    (config,) = run.config_updates
    assert config["corpus"]["train_sequences"] > 0 and config["teacher_baseline"] == summary["teacher"]
    assert run.summary["student/mlm_accuracy"] == summary["student"]["mlm_accuracy"] and run.summary["step"] == 2
    (artifact,) = run.artifacts
    assert artifact.type == "model" and "model.safetensors" in {e.path for e in artifact.manifest.entries.values()}


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "tv"])
def test_other_divergences_train(tiny_teacher_dir, tmp_path, divergence):
    out = tmp_path / divergence
    train_mod.train(recipe(tiny_teacher_dir, out, "train.max_steps=2", "train.log_every=1",
                           f"loss.divergence={divergence}"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "loss/ce" in x]
    assert len(rows) == 2 and all(math.isfinite(r["loss/ce"]) and r["loss/ce"] > 0 for r in rows)
    if divergence == "tv":
        assert all(r["loss/ce"] <= 4.0 for r in rows)  # T^2 * TV <= T^2 (T = 2)


def test_without_soft_targets_the_student_trains_on_l_mlm_and_l_cos(tiny_teacher_dir, tmp_path):
    """The no-L_ce ablation: no teacher logits are computed, and L_mlm and L_cos still train the student."""
    out = tmp_path / "no-ce"
    train_mod.train(recipe(tiny_teacher_dir, out, "train.max_steps=2", "train.log_every=1", "loss.alpha_ce=0"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "loss/mlm" in x]
    assert len(rows) == 2 and all(r["loss/ce"] == 0 and r["loss/mlm"] > 0 and r["loss/cos"] > 0 for r in rows)
    assert (out / "student" / "model.safetensors").is_file()


def test_minilm_relations_train_and_the_recipe_resolves(tiny_teacher_dir, tmp_path):
    minilm = resolve(ROOT / "recipes" / "minilmv2.yaml")
    assert minilm.loss.alpha_relation == 1.0 and minilm.loss.alpha_ce == 0 and minilm.teacher.name_or_path == "minilm"
    out = tmp_path / "rel"
    # the tiny teacher: 4 layers x 32, 2 heads; relations of its layer 3 into the 2-layer student's last layer
    train_mod.train(recipe(tiny_teacher_dir, out, "train.max_steps=3", "train.log_every=1", "loss.alpha_ce=0",
                           "loss.alpha_mlm=0", "loss.alpha_cos=0", "loss.alpha_relation=1", "loss.relation_heads=4",
                           "loss.relation_layer=3", "loss.alpha_value_relation=0.5", "student.dropout=0"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "loss/relation" in x]
    assert len(rows) == 3 and all(r["loss/relation"] > 0 and r["loss/value_relation"] > 0 for r in rows)
    assert rows[-1]["loss/relation"] < rows[0]["loss/relation"]  # it learns
