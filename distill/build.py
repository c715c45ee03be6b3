"""A distillation run's parts, built from its recipe: every check that can run before slow work
(`preflight`), the teacher (adapted once and cached when asked), the student, the step's kernels, and the
rules for resuming a run directory. distill.train runs the loop over them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import yaml
from torch import nn
from transformers import DistilBertConfig

from distill import hub, rundir, tracking
from distill.adapt import adapt_teacher
from distill.corpus import check_files, corpus_identity
from distill.mechanics import DTYPES
from distill.recipe_loader import deep_merge, from_dict
from distill.recipes import Recipe, RecipeError
from distill.step import layer_pairs
from students.config import config_from_teacher, create_model_config, half_depth
from students.init import default_layers, init_from_teacher
from students.modeling import DistilBERTForMaskedLM
from teachers.teacher import Teacher, TeacherError, has_mlm_head, resolve_teacher_path, teacher_config

logger = logging.getLogger(__name__)

# Keys that may change between a run and its resumption (they do not change the computation).
RESUMABLE_CHANGES = ("train.max_steps", "teacher.adapt.save_every",
                     "train.log_every", "train.eval_every", "train.save_every",
                     "train.keep_checkpoints", "train.num_workers", "train.cpu_threads",
                     "train.eval_batches", "train.eval_mask_draws",
                     "tracking.",
                     "train.compile", "train.loss_kernel", "train.peak_tflops",
                     "train.compile_loss",  # (recorded by runs of earlier versions)
                     "output_dir",  # a moved or copied run directory resumes
                     "hub.")


# ------------------------------------------------------------------------------------------ set-up
def loss_kernel(recipe: Recipe, device: torch.device) -> str:
    """The vocabulary losses' kernel: the recipe's, or for `auto` Triton on CUDA and eager PyTorch elsewhere."""
    kernel = recipe.train.loss_kernel
    other = recipe.loss.divergence != "forward_kl" and recipe.loss.alpha_ce > 0
    if kernel == "auto":
        # the Triton kernel computes the forward KL; other divergences run as torch.compile'd PyTorch on CUDA
        kernel = ("compiled" if other else "triton") if device.type == "cuda" else "eager"
    if kernel == "triton" and other:
        raise RecipeError(f"train.loss_kernel=triton computes the forward KL only; loss.divergence="
                          f"{recipe.loss.divergence} needs train.loss_kernel auto, eager or compiled")
    if kernel == "triton":
        if device.type != "cuda":
            raise RecipeError("train.loss_kernel=triton needs a CUDA device; use auto or eager")
        try:
            import triton  # noqa: F401
        except ImportError as e:
            raise RecipeError("train.loss_kernel=triton needs the triton package (pip install triton), or set "
                              "train.loss_kernel=eager") from e
    return kernel


def compile_enabled(recipe: Recipe, device: torch.device) -> bool:
    return device.type == "cuda" if recipe.train.compile == "auto" else bool(recipe.train.compile)


def adapted_teacher(recipe: Recipe, tokenizer, corpus, accelerator) -> Path:
    """The recipe's teacher after `teacher.adapt` (adapted once on the main process, then cached)."""
    with accelerator.main_process_first():
        return adapt_teacher(recipe.teacher.name_or_path, tokenizer, corpus, corpus_identity(recipe.data, tokenizer),
                             recipe.teacher.adapt, recipe.masking, device=accelerator.device)


def build_teacher(recipe: Recipe, tokenizer, corpus, accelerator) -> Teacher:
    """Load the teacher; adapt it first (once, cached) when the recipe asks for it."""
    teacher_cfg = recipe.teacher
    attn = "eager" if recipe.loss.alpha_attn else "sdpa"  # attention transfer needs the probabilities
    adapt = teacher_cfg.adapt.steps > 0
    source = str(adapted_teacher(recipe, tokenizer, corpus, accelerator)) if adapt else teacher_cfg.name_or_path
    teacher = Teacher.load(source, dtype=DTYPES[teacher_cfg.dtype], attn_implementation=attn)
    teacher.check_tokenizer(tokenizer)
    if accelerator.is_main_process:
        # runs/<run>/teacher: the exact teacher used (e.g. the cached adaptation), for fine-tuning and reports.
        rundir.link_teacher(Path(recipe.output_dir), resolve_teacher_path(source))
    return teacher.to(accelerator.device)


def build_student(recipe: Recipe, teacher: Teacher) -> DistilBERTForMaskedLM:
    """The student the recipe asks for, with its dropout setting applied."""
    student = _initial_student(recipe, teacher)
    if recipe.student.dropout is not None:
        student.config.dropout = student.config.attention_dropout = recipe.student.dropout
        for m in student.modules():
            if isinstance(m, nn.Dropout):
                m.p = recipe.student.dropout
    return student


def _initial_student(recipe: Recipe, teacher: Teacher) -> DistilBERTForMaskedLM:
    student_cfg = recipe.student
    if student_cfg.init == "teacher":
        config = create_model_config(student_cfg.preset) if student_cfg.preset else None  # checked against the teacher
        if config is not None and student_cfg.n_layers:
            config.n_layers = student_cfg.n_layers
        n = config.n_layers if config is not None else student_cfg.n_layers or half_depth(teacher.num_layers)
        return init_from_teacher(teacher, student_cfg.layers or default_layers(teacher.num_layers, n), config=config)
    if student_cfg.init == "random":
        config = (create_model_config(student_cfg.preset) if student_cfg.preset
                  else config_from_teacher(teacher.config, n_layers=student_cfg.n_layers))
        if student_cfg.preset and student_cfg.n_layers:
            config.n_layers = student_cfg.n_layers
        return DistilBERTForMaskedLM(config)
    if not Path(student_cfg.init).is_dir():
        raise FileNotFoundError(f"student.init {student_cfg.init!r}: use 'teacher', 'random' or a checkpoint directory")
    return DistilBERTForMaskedLM.from_pretrained(student_cfg.init)


def asked_for(name: str) -> bool:
    """Whether `accelerate launch` (flag or config file) asked for FSDP / DEEPSPEED."""
    return os.environ.get(f"ACCELERATE_USE_{name}", "false").lower() == "true"


def check_distribution(accelerator) -> None:
    """Refuse a sharding the user asked for that would not happen, or whose state the checkpoints cannot
    hold. Called before the Accelerator exists (None) and after."""
    from accelerate.utils import DistributedType

    if asked_for("DEEPSPEED") or accelerator and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise RecipeError("DeepSpeed is not supported: its ZeRO optimizer state can only be stored with pickle, which "
                          "the kit's checkpoints never hold; shard with FSDP instead (recipes/accelerate/fsdp.yaml)")
    if accelerator and asked_for("FSDP") and accelerator.distributed_type != DistributedType.FSDP:
        raise RecipeError(f"FSDP was asked for, but Accelerate runs this as {accelerator.distributed_type.value} "
                          "(it applies FSDP on GPUs only); drop --use_fsdp, or launch on GPUs")


def preflight(recipe: Recipe, tokenizer, world: int) -> None:
    """Every check that needs no corpus and no weights, before any slow work (tokenizing, adapting,
    loading): data files, the Hub push, the teacher's config and files, vocabulary, positions, student
    shape. (The precision on this device is checked when the Accelerator is made.)"""
    student_cfg, batch_size = recipe.student, recipe.train.batch_size
    check_files(recipe.data)
    hub.check_push(recipe.hub)
    if batch_size % world:
        raise RecipeError(f"train.batch_size={batch_size} must be a multiple of the {world} processes")
    teacher_conf = teacher_config(recipe.teacher.name_or_path)
    if len(tokenizer) != teacher_conf.vocab_size:
        raise TeacherError(f"vocabulary mismatch: teacher {recipe.teacher.name_or_path} has {teacher_conf.vocab_size} "
                           f"tokens, tokenizer {recipe.tokenizer} {len(tokenizer)}; use the teacher's tokenizer")
    positions = teacher_conf.max_position_embeddings
    if recipe.data.max_length > positions:
        raise RecipeError(f"data.max_length={recipe.data.max_length} exceeds the teacher's {positions} position "
                          f"embeddings; set data.max_length<={positions}")
    if recipe.teacher.adapt.steps == 0 and has_mlm_head(recipe.teacher.name_or_path) is False:
        raise TeacherError(f"teacher {recipe.teacher.name_or_path} has no trained MLM head; adapt it first "
                           "(recipe: teacher.adapt.steps > 0)")
    depth = teacher_conf.num_hidden_layers
    student_conf = student_config(recipe, teacher_conf)
    n = student_conf.n_layers
    if student_cfg.init == "teacher":
        if n > depth:
            raise RecipeError(f"student.n_layers={n} is deeper than the teacher ({depth} layers); student.init="
                              f"teacher copies teacher layers: use student.n_layers<={depth}")
        bad = [i for i in student_cfg.layers or [] if not 0 <= i < depth]
        if bad:
            raise RecipeError(f"student.layers {bad} are not teacher layers (0..{depth - 1})")
        if student_cfg.layers is not None and len(student_cfg.layers) != n:
            raise RecipeError(f"student.layers lists {len(student_cfg.layers)} layers for a {n}-layer student")
    loss = recipe.loss
    layer_pairs(loss, n, depth)  # raises on layer_map pairs or a relation layer out of range
    heads = loss.relation_heads or teacher_conf.num_attention_heads
    if loss.alpha_relation and (teacher_conf.hidden_size % heads or student_conf.dim % heads):
        raise RecipeError(f"loss.relation_heads={heads} must divide both widths (teacher {teacher_conf.hidden_size}, "
                          f"student {student_conf.dim})")
    if loss.alpha_value_relation and student_conf.n_heads != teacher_conf.num_attention_heads:
        raise RecipeError(f"loss.alpha_value_relation (MiniLM v1) needs equal head counts (student "
                          f"{student_conf.n_heads}, teacher {teacher_conf.num_attention_heads}); "
                          "use loss.alpha_relation")


def student_config(recipe: Recipe, teacher_conf):
    """The student's config as `build_student` will make it, read without weights (for `preflight`): a
    preset (checked against the teacher), a checkpoint directory's config, or one derived from the teacher."""
    student_cfg, data = recipe.student, recipe.data
    if student_cfg.init not in ("teacher", "random"):
        path = Path(student_cfg.init)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"student.init {student_cfg.init!r}: use 'teacher', 'random' or a checkpoint "
                                    "directory with a config.json")
        return DistilBertConfig.from_pretrained(path)
    if not student_cfg.preset:
        return config_from_teacher(teacher_conf, n_layers=student_cfg.n_layers)
    try:
        preset_conf = create_model_config(student_cfg.preset)
    except ValueError as e:
        raise RecipeError(f"student.preset: {e}") from None
    if preset_conf.vocab_size != teacher_conf.vocab_size:
        raise RecipeError(f"student.preset {student_cfg.preset!r} has {preset_conf.vocab_size} tokens, the teacher "
                          f"{teacher_conf.vocab_size}")
    shape = (preset_conf.dim, preset_conf.n_heads, preset_conf.hidden_dim)
    teacher_shape = (teacher_conf.hidden_size, teacher_conf.num_attention_heads, teacher_conf.intermediate_size)
    if student_cfg.init == "teacher" and shape != teacher_shape:
        raise RecipeError(f"student.preset {student_cfg.preset!r} ({shape[0]} wide, {shape[1]} heads) cannot be "
                          f"initialised from the teacher ({teacher_shape[0]} wide, {teacher_shape[1]} heads); use "
                          "student.init=random or no preset")
    if preset_conf.max_position_embeddings < data.max_length:
        raise RecipeError(f"data.max_length={data.max_length} exceeds student.preset's "
                          f"{preset_conf.max_position_embeddings} positions")
    if student_cfg.n_layers:
        preset_conf.n_layers = student_cfg.n_layers
    return preset_conf


def check_resumable(saved: dict, recipe: Recipe) -> None:
    """A run directory is resumed only by the same recipe (up to keys that do not change the math)."""
    saved = _with_defaults(saved)
    changed = [k for k in changed_keys(saved, recipe.to_dict()) if not k.startswith(RESUMABLE_CHANGES)]
    if changed:
        raise RecipeError(f"{recipe.output_dir} holds a run with a different recipe ({', '.join(changed[:3])} "
                          "differ); use another output_dir, or pass --overwrite to replace that run")
    old = (saved.get("train") or {}).get("max_steps")
    if old is not None and old != recipe.train.max_steps:
        train_cfg = recipe.train
        logger.warning("train.max_steps changed from %s to %s on resume: the learning-rate schedule changes from "
                       "here on (warmup %d steps, linear decay to 0 at step %d)", old, train_cfg.max_steps,
                       int(train_cfg.warmup_fraction * train_cfg.max_steps), train_cfg.max_steps)


def changed_keys(a: dict, b: dict) -> list[str]:
    """The keys of two recipes (nested mappings) whose values differ, as dotted paths, sorted."""
    a, b = tracking.flatten(a, "."), tracking.flatten(b, ".")
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _with_defaults(saved: dict) -> dict:
    """A saved recipe with the defaults of keys added since it was written (its run used those defaults), but
    train.eval_seed: a run written before that key evaluated with its train.seed."""
    train = saved.get("train")
    if isinstance(train, dict) and "seed" in train and "eval_seed" not in train:
        saved = deep_merge(saved, {"train": {"eval_seed": train["seed"]}})
    return deep_merge(Recipe().to_dict(), saved)


def run_recipe(run_dir: Path) -> Recipe:
    """The recipe a run directory's run used: its recipe.yaml, with the keys added since as that run had them."""
    saved = read_saved_recipe(run_dir)
    if saved is None:
        raise RecipeError(f"{run_dir} has no recipe.yaml: give the directory of a distillation run")
    data = _with_defaults(saved)
    data.pop("kind", None)
    return from_dict(Recipe, data)


def read_saved_recipe(run_dir: Path) -> dict | None:
    path = run_dir / "recipe.yaml"
    if not path.exists():
        return None
    try:
        saved = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path} is not a readable recipe ({type(e).__name__}); use another output_dir, or "
                          "pass --overwrite to replace that run") from None
    if not isinstance(saved, dict):
        raise RecipeError(f"{path} is not a recipe mapping; use another output_dir, or pass --overwrite")
    return saved
