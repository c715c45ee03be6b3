"""The bad-input catalogue: every case exits 2 with one `error:` line naming the problem, no traceback,
and no file that was on disk before the call changed.

Cases run through `distill.run.main` in this process (a traceback would fail the test as an exception);
each gets a fresh Accelerate state and a fresh directory. Signals, concurrent runs and the launcher's death
are in test_rundir.py and test_train.py (they need real processes).
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from distill import run as run_mod
from distill.recipe_loader import resolve
from tests.cli import ROOT, TINY, popen

FINETUNE = ROOT / "recipes" / "finetune" / "wiki-topics.yaml"


@dataclass
class Case:
    id: str
    args: list[str] = field(default_factory=list)  # overrides (or flags)
    message: str = ""  # a regular expression the error line must match
    setup: Callable[[Path, Path], list[str]] | None = None  # (tmp, teacher) -> more overrides
    recipe: Path | str | None = None  # default: the tiny distillation recipe
    env: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- set-ups
def teacher_copy(tmp: Path, teacher: Path, edit=None) -> Path:
    out = tmp / "teacher-copy"
    shutil.copytree(teacher, out)
    if edit:
        edit(out)
    return out


def with_teacher(edit):
    return lambda tmp, teacher: [f"teacher.name_or_path={teacher_copy(tmp, teacher, edit)}"]


def edit_config(**changes):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def headless(d):
    tensors = {k: v for k, v in load_file(str(d / "model.safetensors")).items() if not k.startswith("cls.")}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})


def truncate(name):
    def edit(d):
        f = d / name
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    return edit


def data_file(name: str, content: bytes, *extra: str):
    def setup(tmp, teacher):
        f = tmp / name
        f.write_bytes(content)
        return ["data.source=files", f"data.files=[{f}]", *extra]
    return setup


def recipe_file(text: str, name="bad.yaml"):
    def setup(tmp, teacher):
        (tmp / name).write_text(text)
        return []
    return setup


def run_dir_with(kind: str):
    def setup(tmp, teacher):
        out = tmp / "run"
        out.mkdir()
        # as a run writes it: the precision resolved (Accelerate's "no" on this CPU)
        base = resolve(TINY, [f"teacher.name_or_path={teacher}", f"output_dir={out}", "train.mixed_precision=no"])
        if kind == "other-recipe":
            other = resolve(TINY, [f"teacher.name_or_path={teacher}", f"output_dir={out}", "train.lr=0.1",
                                   "train.mixed_precision=no"])
            (out / "recipe.yaml").write_text(other.to_yaml())
            (out / "metrics.jsonl").write_text('{"step": 1, "loss/total": 1.0}\n')
        elif kind == "finished":
            (out / "recipe.yaml").write_text(base.to_yaml())
            (out / "student").mkdir()
            (out / "student" / "config.json").write_text("{}")
        elif kind == "garbage-recipe":
            (out / "recipe.yaml").write_bytes(b"\xff\xfe: [")
        elif kind == "locked-here":
            (out / ".lock").write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "since": "boot"}))
        elif kind == "locked-elsewhere":
            (out / ".lock").write_text(json.dumps({"pid": 4242, "host": "gpu-node-7", "since": "yesterday"}))
        elif kind in ("legacy", "damaged", "other-world"):
            (out / "recipe.yaml").write_text(base.to_yaml())
            ckpt = out / "checkpoints" / "step-00000003"
            ckpt.mkdir(parents=True)
            if kind == "legacy":
                (ckpt / "trainer_state.json").write_text('{"step": 3}')
                (ckpt / "random_states_0.pkl").write_bytes(pickle.dumps({"x": 1}))
            else:
                files = {"model.safetensors": {"size": 1, "sha256": "0"}}
                world = 2 if kind == "other-world" else 1
                (ckpt / "model.safetensors").write_bytes(b"x" * (1 if kind == "damaged" else 2))
                (ckpt / "manifest.json").write_text(json.dumps(
                    {"format": "distilbert-kit-checkpoint/2", "step": 3, "world": world, "files": files}))
        elif kind == "is-file":
            out.rmdir()
            out.write_text("not a directory")
        return [f"output_dir={out}"]
    return setup


def student_dir(with_config: bool):
    def setup(tmp, teacher):
        d = tmp / "student-init"
        d.mkdir()
        if with_config:
            (d / "notes.txt").write_text("no config here")
        return [f"student.init={d}"]
    return setup


def mixed_formats(tmp, teacher):
    (tmp / "a.txt").write_text("some text")
    (tmp / "b.jsonl").write_text('{"text": "more text"}\n')
    return ["data.source=files", f"data.files=[{tmp / 'a.txt'},{tmp / 'b.jsonl'}]"]


# ------------------------------------------------------------------- fine-tuning and task distillation
CLASSIFIER = {"architectures": ["BertForSequenceClassification"], "id2label": {"0": "a", "1": "b"},
              "label2id": {"a": 0, "b": 1}}


def swap_two_tokens(d):
    tok = json.loads((d / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["the"], vocab["of"] = vocab["of"], vocab["the"]
    (d / "tokenizer.json").write_text(json.dumps(tok))


def task_teacher(*edits, same_as_model=False):
    """model= the tiny teacher (an MLM model, as a fine-tune of the teacher starts), distill.teacher= a copy of
    it edited by `edits` (config changes, file edits)."""
    def setup(tmp, teacher):
        model = teacher_copy(tmp, teacher)
        if same_as_model:
            return [f"model={model}", f"distill.teacher={model}", f"output_dir={tmp / 'ft'}"]
        t = tmp / "teacher-ft"
        shutil.copytree(teacher, t)
        for edit in edits:
            edit(t)
        return [f"model={model}", f"distill.teacher={t}", f"output_dir={tmp / 'ft'}"]
    return setup


def finetune_dir_with(kind: str):
    def setup(tmp, teacher):
        model, out = teacher_copy(tmp, teacher), tmp / "ft"
        args = [f"model={model}", f"output_dir={out}"]
        if kind == "is-file":
            out.write_text("not a directory")
            return args
        if kind == "is-model":
            return [f"model={model}", f"output_dir={model}"]
        if kind == "holds-model":
            shutil.copytree(teacher, out)
            return args
        out.mkdir()
        if kind == "finished":
            (out / "recipe.yaml").write_text(resolve(FINETUNE, args).to_yaml())
            (out / "results.json").write_text('{"test": {"accuracy": 0.9}}')
            (out / "config.json").write_text("{}")
        elif kind == "other-recipe":
            # as a run writes it: the precision resolved (Accelerate's "no" on this CPU)
            (out / "recipe.yaml").write_text(resolve(FINETUNE, [*args, "train.lr=0.1", "train.mixed_precision=no"]
                                                     ).to_yaml())
            (out / "metrics.jsonl").write_text('{"step": 20, "loss/train": 1.0}\n')
        elif kind == "locked":
            (out / ".lock").write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "since": "boot"}))
        return args
    return setup


UTF16 = "a wikipedia article about cats\n".encode("utf-16")
JSONL = b'{"text": "the cat sat on the mat and looked at the dog for a while"}\n' * 50

CASES = [
    # --- the recipe file and its overrides
    Case("unknown-key", ["trian.max_steps=3"], r"unknown recipe key 'trian'.*did you mean 'train'"),
    Case("unknown-nested-key", ["train.batch_sise=3"], r"unknown recipe key 'train.batch_sise'.*batch_size"),
    Case("negative-lr", ["train.lr=-1"], r"train.lr must be > 0"),
    Case("string-lr", ["train.lr=fast"], r"train.lr must be a number, got 'fast'"),
    Case("zero-steps", ["train.max_steps=0"], r"train.max_steps must be > 0"),
    Case("float-steps", ["train.max_steps=1.5"], r"train.max_steps must be an integer"),
    Case("zero-batch", ["train.batch_size=0"], r"train.batch_size must be > 0"),
    Case("zero-accum", ["train.grad_accum=0"], r"train.grad_accum must be > 0"),
    Case("one-beta", ["train.betas=[0.9]"], r"train.betas must be two"),
    Case("beta-above-one", ["train.betas=[0.9,1.5]"], r"train.betas must be two in \[0, 1\)"),
    Case("warmup-one", ["train.warmup_fraction=1"], r"train.warmup_fraction must be in"),
    Case("lr-infinite", ["train.lr=.inf"], r"train.lr must be a finite number, got inf"),
    Case("lr-inf-string", ["train.lr=inf"], r"train.lr must be a finite number, got 'inf'"),
    Case("temperature-nan", ["loss.temperature=.nan"], r"loss.temperature must be a finite number, got nan"),
    Case("eps-zero", ["train.eps=0"], r"train.eps must be > 0"),
    Case("weight-decay-negative", ["train.weight_decay=-0.1"], r"train.weight_decay must be >= 0"),
    Case("seed-negative", ["train.seed=-1"], r"train.seed must be in \[0, 2\*\*32\), got -1"),
    Case("seed-too-big", ["train.seed=4294967296"], r"train.seed must be in \[0, 2\*\*32\)"),
    Case("eval-seed-negative", ["train.eval_seed=-3"], r"train.eval_seed must be in \[0, 2\*\*32\)"),
    Case("adapt-seed-negative", ["teacher.adapt.seed=-1"], r"teacher.adapt.seed must be in \[0, 2\*\*32\)"),
    Case("keep-zero", ["train.keep_checkpoints=0"], r"train.keep_checkpoints must be >= 1"),
    Case("precision-fp8", ["train.mixed_precision=fp8"], r"train.mixed_precision is 'fp8'; choose one of"),
    Case("kernel-unknown", ["train.loss_kernel=cuda"], r"train.loss_kernel is 'cuda'"),
    Case("kernel-triton-cpu", ["train.loss_kernel=triton"], r"loss_kernel=triton needs a CUDA device"),
    Case("compile-maybe", ["train.compile=maybe"], r"train.compile"),
    Case("peak-zero", ["train.peak_tflops=0"], r"train.peak_tflops must be > 0"),
    Case("log-every-zero", ["train.log_every=0"], r"train.log_every must be > 0"),
    Case("eval-every-zero", ["train.eval_every=0"], r"train.eval_every must be > 0"),
    Case("save-every-negative", ["train.save_every=-1"], r"train.save_every must be > 0"),
    Case("eval-batches-zero", ["train.eval_batches=0"], r"train.eval_batches must be > 0"),
    Case("temperature-zero", ["loss.temperature=0"], r"loss.temperature must be > 0"),
    Case("negative-weight", ["loss.alpha_ce=-1"], r"loss weights must be >= 0"),
    Case("all-weights-zero", ["loss.alpha_ce=0", "loss.alpha_mlm=0", "loss.alpha_cos=0"],
         r"at least one loss weight must be > 0"),
    Case("layer-map-shape", ["loss.layer_map=[[1]]"], r"loss.layer_map must be \[\[student, teacher\]"),
    Case("layer-map-range", ["loss.layer_map=[[9,9]]", "loss.alpha_hidden_mse=1"],
         r"loss.layer_map pairs.*out of range"),
    Case("divergence-unknown", ["loss.divergence=kl"], r"loss.divergence is 'kl'; choose one of"),
    Case("jsd-beta-one", ["loss.divergence=jsd", "loss.jsd_beta=1"], r"loss.jsd_beta must be in \(0, 1\)"),
    Case("relation-heads-width", ["loss.alpha_relation=1", "loss.relation_heads=5"],
         r"loss.relation_heads=5 must divide both widths \(teacher 32, student 32\)"),
    Case("relation-layer-range", ["loss.alpha_relation=1", "loss.relation_layer=9"],
         r"loss.relation_layer=9 is not a teacher layer \(1..4\)"),
    Case("mask-probability-zero", ["masking.probability=0"], r"masking.probability must be in \(0, 1\)"),
    Case("mask-probability-big", ["masking.probability=1.5"], r"masking.probability must be in"),
    Case("mask-fractions-sum", ["masking.mask_fraction=0.9", "masking.random_fraction=0.2"],
         r"mask_fraction \+ random_fraction must be <= 1"),
    Case("smoothing-negative", ["masking.smoothing=-1"], r"masking.smoothing must be >= 0"),
    Case("max-length-tiny", ["data.max_length=4"], r"data.max_length must be in \[8, 8192\]"),
    Case("max-length-huge", ["data.max_length=100000"], r"data.max_length must be in"),
    Case("validation-zero", ["data.validation_fraction=0"], r"data.validation_fraction must be in"),
    Case("validation-most", ["data.validation_fraction=0.7"], r"data.validation_fraction must be in"),
    Case("source-unknown", ["data.source=web"], r"data.source is 'web'; choose one of"),
    Case("hub-without-name", ["data.source=hub"], r"data.name is required"),
    Case("files-without-files", ["data.source=files"], r"data.files must list at least one file"),
    Case("num-proc-zero", ["data.num_proc=0"], r"data.num_proc must be >= 1"),
    Case("max-documents-zero", ["data.max_documents=0"], r"data.max_documents must be >= 1"),
    Case("max-documents-negative", ["data.max_documents=-5"], r"data.max_documents must be >= 1"),
    Case("files-not-a-list", ["data.files=corpus.txt"], r"data.files must be a list"),
    Case("student-zero-layers", ["student.n_layers=0"], r"student.n_layers must be > 0"),
    Case("dropout-one", ["student.dropout=1.0"], r"student.dropout must be in \[0, 1\)"),
    Case("layers-count", ["student.n_layers=2", "student.layers=[0,1,2]"], r"student.layers must list"),
    Case("preset-unknown", ["student.preset=bert-huge"], r"unknown model config 'bert-huge'"),
    Case("teacher-dtype", ["teacher.dtype=float64"], r"teacher.dtype is 'float64'"),
    Case("adapt-negative", ["teacher.adapt.steps=-1"], r"teacher.adapt.steps must be >= 0"),
    Case("adapt-batch-zero", ["teacher.adapt.batch_size=0"], r"teacher.adapt.batch_size must be > 0"),
    Case("kind-unknown", ["kind=pretrain"], r"kind 'pretrain' is not one of"),
    Case("wandb-maybe", ["tracking.wandb=maybe"], r"tracking.wandb must be true or false"),
    Case("override-no-equals", ["train.max_steps"], r"override 'train.max_steps' must look like key.path=value"),
    Case("override-bad-yaml", ["train.lr=[1"], r"value is not valid YAML"),
    Case("override-into-value", ["train.lr.x=1"], r"train.lr must be a number, got \{'x': 1\}"),
    Case("recipe-missing", [], r"recipe file .*nope.yaml not found", recipe="nope.yaml"),
    Case("recipe-bad-yaml", [], r"is not valid YAML", recipe="bad.yaml", setup=recipe_file("train: [1,\n")),
    Case("recipe-list", [], r"must be a mapping at top level", recipe="bad.yaml", setup=recipe_file("- 1\n- 2\n")),
    Case("extends-missing", [], r"recipe file .*parent.yaml not found", recipe="bad.yaml",
         setup=recipe_file("extends: parent.yaml\n")),
    Case("extends-cycle", [], r"extends itself", recipe="bad.yaml", setup=recipe_file("extends: bad.yaml\n")),
    Case("extends-list", [], r"extends must be one file name", recipe="bad.yaml",
         setup=recipe_file("extends: [a.yaml, b.yaml]\n")),
    Case("flag-adapt-finetune", ["--adapt-only"], r"--adapt-only needs a distill recipe", recipe=FINETUNE),
    # --- the teacher and the tokenizer (all refused before the corpus is tokenized)
    Case("teacher-missing", ["teacher.name_or_path=./no-such-teacher"],
         r"teacher ./no-such-teacher: directory not found"),
    Case("teacher-no-config", [], r"no config.json", setup=with_teacher(lambda d: (d / "config.json").unlink())),
    Case("teacher-no-weights", [], r"no weights in the directory",
         setup=with_teacher(lambda d: (d / "model.safetensors").unlink())),
    Case("teacher-config-garbage", [], r"config could not be read",
         setup=with_teacher(lambda d: (d / "config.json").write_text("{not json"))),
    Case("teacher-not-bert", [], r"model_type 'distilbert', expected 'bert'",
         setup=with_teacher(edit_config(model_type="distilbert"))),
    Case("teacher-no-head", [], r"has no trained MLM head; adapt it first", setup=with_teacher(headless)),
    Case("teacher-weights-truncated", [], r"could not be loaded|is damaged",
         setup=with_teacher(truncate("model.safetensors"))),
    Case("teacher-vocab-mismatch", [], r"vocabulary mismatch.*1000 tokens",
         setup=with_teacher(edit_config(vocab_size=1000))),
    Case("teacher-hub-offline", ["teacher.name_or_path=nobody/no-such-bert-model"],
         r"teacher 'nobody/no-such-bert-model': its config could not be read"),
    Case("max-length-over-positions", ["data.max_length=256"], r"data.max_length=256 exceeds the teacher's 128"),
    Case("tokenizer-dir-missing", ["tokenizer=./no-tokenizer"], r"tokenizer ./no-tokenizer: not a directory"),
    Case("tokenizer-dir-empty", [], r"the directory has none of",
         setup=lambda tmp, t: [f"tokenizer={(tmp / 'empty-tok').mkdir() or tmp / 'empty-tok'}"]),
    # --- the student
    Case("student-deeper-than-teacher", ["student.n_layers=6"], r"student.n_layers=6 is deeper than the teacher \(4"),
    Case("student-layer-out-of-range", ["student.n_layers=2", "student.layers=[0,9]"],
         r"student.layers \[9\] are not teacher layers"),
    Case("student-preset-width", ["student.preset=minilm-l6-h384"], r"cannot be initialised from the teacher"),
    Case("student-init-missing", ["student.init=./no-student"], r"student.init './no-student'"),
    Case("student-init-no-config", [], r"with a config.json", setup=student_dir(True)),
    # --- the corpus
    Case("data-file-missing", ["data.source=files", "data.files=[./nope.jsonl]"], r"data file ./nope.jsonl not found"),
    Case("data-file-empty", [], r"is empty", setup=data_file("empty.txt", b"")),
    Case("data-file-not-utf8", [], r"is not UTF-8 text",
         setup=data_file("latin.txt", "caf\xe9 na\xefve\n".encode("latin-1"))),
    Case("data-file-utf16", [], r"is not UTF-8 text", setup=data_file("wide.txt", UTF16)),
    Case("data-file-blank-lines", [], r"has no text \(only blank lines\)",
         setup=data_file("blank.txt", b"\n\n  \n\t\n")),
    Case("data-file-suffix", [], r"suffix \['.docx'\] are not supported", setup=data_file("a.docx", b"text")),
    Case("data-file-directory", [], r"is not a file",
         setup=lambda tmp, t: (tmp / "d").mkdir() or ["data.source=files", f"data.files=[{tmp / 'd'}]"]),
    Case("data-jsonl-no-field", [], r"bad.jsonl line 1 has no field 'body'",
         setup=data_file("bad.jsonl", JSONL, "data.text_field=body")),
    Case("data-jsonl-malformed", [], r"data file .*bad.jsonl line 2 is not JSON",
         setup=data_file("bad.jsonl", b'{"text": "a"}\n{"text": \n')),
    Case("data-jsonl-not-object", [], r"bad.jsonl line 1 is not a JSON object",
         setup=data_file("bad.jsonl", b'["text", "a"]\n')),
    Case("data-json-broken", [], r"bad.json could not be read as json",
         setup=data_file("bad.json", b'{"text": ["a", "b"')),
    Case("data-no-validation", [], r"no validation text",
         setup=data_file("one.txt", b"just one short line of text here\n", "data.validation_fraction=0.001")),
    Case("data-mixed-formats", [], r"mix formats", setup=mixed_formats),
    # --- the environment and the device
    Case("fp16-on-cpu", ["train.mixed_precision=fp16"], r"fp16 is not supported on CPUs"),
    Case("cpu-threads-zero", ["train.cpu_threads=0"], r"train.cpu_threads must be > 0"),
    Case("omp-num-threads-not-a-number", [], r"OMP_NUM_THREADS='two' is not a positive number of threads",
         env={"OMP_NUM_THREADS": "two"}),
    Case("wandb-mode-bogus", ["tracking.wandb=true"], r"WANDB_MODE='sometimes' is not one of",
         env={"WANDB_MODE": "sometimes"}),
    Case("fsdp-on-cpu", [], r"FSDP was asked for, but Accelerate runs this as NO", env={"ACCELERATE_USE_FSDP": "true"}),
    Case("deepspeed", [], r"DeepSpeed is not supported", env={"ACCELERATE_USE_DEEPSPEED": "true"}),
    # --- the run directory and its checkpoints
    Case("rundir-other-recipe", [], r"holds a run with a different recipe \(train.lr",
         setup=run_dir_with("other-recipe")),
    Case("rundir-finished", [], r"holds an exported student.*pass --overwrite", setup=run_dir_with("finished")),
    Case("rundir-recipe-garbage", [], r"recipe.yaml is not a readable recipe", setup=run_dir_with("garbage-recipe")),
    Case("rundir-locked-here", [], r"in use by another run \(pid 1", setup=run_dir_with("locked-here")),
    Case("rundir-locked-elsewhere", [], r"locked by a run on host gpu-node-7", setup=run_dir_with("locked-elsewhere")),
    Case("rundir-is-a-file", [], r"output_dir .* is a file", setup=run_dir_with("is-file")),
    Case("checkpoint-legacy-pickle", [], r"earlier version's checkpoint", setup=run_dir_with("legacy")),
    Case("checkpoint-all-damaged", [], r"no usable checkpoint.*step-00000003", setup=run_dir_with("damaged")),
    Case("checkpoint-other-world", [], r"no usable checkpoint", setup=run_dir_with("other-world")),
    # --- fine-tuning recipes
    Case("finetune-seed-negative", ["train.seed=-1"], r"train.seed must be in \[0, 2\*\*32\)", recipe=FINETUNE),
    Case("finetune-weight-decay-negative", ["train.weight_decay=-1"], r"train.weight_decay must be >= 0",
         recipe=FINETUNE),
    Case("finetune-lr-nan", ["train.lr=.nan"], r"train.lr must be a finite number", recipe=FINETUNE),
    Case("finetune-epochs-zero", ["train.epochs=0"], r"train.epochs must be > 0", recipe=FINETUNE),
    Case("finetune-cpu-threads-zero", ["train.cpu_threads=0"], r"train.cpu_threads must be > 0", recipe=FINETUNE),
    Case("finetune-omp-num-threads-zero", [], r"OMP_NUM_THREADS='0' is not a positive number of threads",
         env={"OMP_NUM_THREADS": "0"}, setup=finetune_dir_with("new"), recipe=FINETUNE),
    Case("finetune-model-missing", ["model=./no-model"], r"no-model", recipe=FINETUNE),
    Case("finetune-files-no-splits", ["task.source=files"], r"task.splits must name files", recipe=FINETUNE),
    Case("finetune-model-path-not-hub-id", ["model=runs/wiki/student"],
         r"runs/wiki/student is not a model directory \(nor a Hub model id\)", recipe=FINETUNE),
    Case("finetune-file-missing", ["task.source=files", "task.splits={train: a.jsonl, test: b.jsonl}"],
         r"task file a.jsonl not found", setup=finetune_dir_with("new"), recipe=FINETUNE),
    Case("finetune-unknown-task", ["task.source=glue"], r"task.source is 'glue'", recipe=FINETUNE),
    Case("finetune-max-length-over-positions", ["task.max_length=512"],
         r"task.max_length 512 exceeds the 128 position embeddings of model", setup=finetune_dir_with("new"),
         recipe=FINETUNE),
    Case("finetune-output-is-file", [], r"output_dir .* is a file", setup=finetune_dir_with("is-file"),
         recipe=FINETUNE),
    Case("finetune-output-finished", [], r"holds a finished fine-tune \(results.json\).*--overwrite",
         setup=finetune_dir_with("finished"), recipe=FINETUNE),
    Case("finetune-output-holds-model", [], r"holds a model \(config.json\)", setup=finetune_dir_with("holds-model"),
         recipe=FINETUNE),
    Case("finetune-output-is-the-model", [], r"output_dir .* is the model's own directory",
         setup=finetune_dir_with("is-model"), recipe=FINETUNE),
    Case("finetune-output-other-recipe", [], r"unfinished fine-tune of another recipe \(train.lr differ",
         setup=finetune_dir_with("other-recipe"), recipe=FINETUNE),
    Case("finetune-output-locked", [], r"in use by another run \(pid 1", setup=finetune_dir_with("locked"),
         recipe=FINETUNE),
    # --- task-specific distillation (distill.teacher)
    Case("task-distill-alpha-negative", ["distill.alpha_ce=-1"], r"distill.alpha_ce and distill.alpha_task must be",
         recipe=FINETUNE),
    Case("task-distill-alphas-zero", ["distill.alpha_ce=0", "distill.alpha_task=0"],
         r"distill.alpha_ce \+ distill.alpha_task must be > 0", recipe=FINETUNE),
    Case("task-distill-temperature-zero", ["distill.temperature=0"], r"distill.temperature must be > 0",
         recipe=FINETUNE),
    Case("task-distill-teacher-missing", ["distill.teacher=./no-teacher"],
         r"distill.teacher ./no-teacher cannot be read", setup=finetune_dir_with("new"), recipe=FINETUNE),
    Case("task-distill-teacher-not-finetuned", [], r"is not a fine-tuned classifier .*BertForMaskedLM",
         setup=task_teacher(), recipe=FINETUNE),
    Case("task-distill-teacher-is-the-model", [], r"is the model being fine-tuned",
         setup=task_teacher(same_as_model=True), recipe=FINETUNE),
    Case("task-distill-teacher-other-vocab-size", [], r"vocabulary of 30000 tokens, the model 30522",
         setup=task_teacher(edit_config(**CLASSIFIER, vocab_size=30000)), recipe=FINETUNE),
    Case("task-distill-teacher-other-token-ids", [], r"another tokenizer vocabulary",
         setup=task_teacher(edit_config(**CLASSIFIER), swap_two_tokens), recipe=FINETUNE),
    Case("task-distill-teacher-short-positions", [], r"exceeds the 64 position embeddings of distill.teacher",
         setup=task_teacher(edit_config(**CLASSIFIER, max_position_embeddings=64)), recipe=FINETUNE),
    Case("task-distill-teacher-other-labels", [], r"fine-tuned on other labels \(2: a, b\) than the task's \(11:",
         setup=task_teacher(edit_config(**CLASSIFIER)), recipe=FINETUNE),
]


def snapshot(root: Path) -> dict[str, tuple[bytes, int] | str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p)] = f"-> {p.readlink()}"
        elif p.is_file():
            out[str(p)] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


@pytest.fixture
def fresh_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_the_catalogue_has_at_least_80_distinct_cases():
    assert len(CASES) >= 80 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tiny_teacher_dir, tmp_path, monkeypatch, capsys, fresh_state):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DISTILBERT_KIT_CACHE", str(tmp_path / "cache"))
    for k, v in case.env.items():
        monkeypatch.setenv(k, v)
    extra = case.setup(tmp_path, Path(tiny_teacher_dir)) if case.setup else []
    recipe = str(case.recipe or TINY)
    base = [] if case.recipe else [f"teacher.name_or_path={tiny_teacher_dir}", f"output_dir={tmp_path / 'run'}"]
    flags = [a for a in case.args if a.startswith("--")]
    overrides = [a for a in case.args if not a.startswith("--")]
    before = snapshot(tmp_path)
    teacher_before = snapshot(Path(tiny_teacher_dir))
    capsys.readouterr()
    code = run_mod.main([recipe, *base, *overrides, *extra, *flags])
    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2, err[-2000:]
    assert len(errors) == 1, err[-2000:]
    assert re.search(case.message, errors[0]), errors[0]
    assert "Traceback" not in err, err
    assert not errors[0].startswith(("error: '", 'error: "')), "the line is quoted"
    after = snapshot(tmp_path)
    changed = [k for k in before if after.get(k) != before[k]]
    assert not changed, f"files changed: {changed}"
    assert snapshot(Path(tiny_teacher_dir)) == teacher_before


# ----------------------------------------------------------------------------------------- signals
def _cli(tiny_teacher_dir, out, *extra):
    return popen("distill/run.py", TINY, f"teacher.name_or_path={tiny_teacher_dir}", f"output_dir={out}", *extra)


@pytest.mark.slow
def test_ctrl_c_while_starting_is_one_line(tiny_teacher_dir, tmp_path):
    proc = _cli(tiny_teacher_dir, tmp_path / "run")
    time.sleep(1.0)  # importing the libraries, resolving, tokenizing: not yet training
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: interrupted") and "Traceback" not in err
    assert not (tmp_path / "run" / ".lock").exists() and out == ""


@pytest.mark.slow
def test_sigterm_while_training_saves_then_exits(tiny_teacher_dir, tmp_path):
    out = tmp_path / "run"
    proc = _cli(tiny_teacher_dir, out, "train.max_steps=100000", "train.save_every=100000", "train.log_every=1")
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and "loss/total" in metrics.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    assert "checkpoint saved at step" in err
    (ckpt,) = (out / "checkpoints").glob("step-*")
    assert (ckpt / "manifest.json").exists() and not (out / ".lock").exists()
