"""The recipe schema: typed, keyword-only dataclasses, one per recipe section, each validating its values
in `__post_init__` (a RecipeError naming the key). Reading YAML files into them (`extends:`, overrides,
type checks, unknown keys) is distill.recipe_loader's job; `to_yaml()` prints a resolved recipe.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import yaml


class RecipeError(ValueError):
    """A recipe problem, reported to the user as one line."""


@dataclass(kw_only=True)
class AdaptConfig:
    """Continued MLM training of a teacher on the corpus before distillation (0 steps: no adaptation)."""

    steps: int = 0
    batch_size: int = 32
    lr: float = 3e-4
    head_lr: float = 1e-3  # the (possibly new) MLM head learns faster than the pretrained body
    warmup_fraction: float = 0.05
    weight_decay: float = 0.01
    eval_batches: int = 20
    seed: int = 0
    save_every: int = 100  # checkpoint in the cache (an interrupted adaptation resumes); does not change the result
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # AdamW, as distillation's
    eps: float = 1e-6
    clip_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        require(self.steps >= 0, "teacher.adapt.steps", "must be >= 0")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "teacher.adapt.betas",
                "must be two in [0, 1)")
        require(self.eps > 0 and self.clip_grad_norm > 0, "teacher.adapt.eps", "eps and clip_grad_norm must be > 0")
        require(self.save_every > 0, "teacher.adapt.save_every", "must be > 0")
        require(self.batch_size > 0, "teacher.adapt.batch_size", "must be > 0")
        require(self.lr > 0 and self.head_lr > 0, "teacher.adapt.lr", "learning rates must be > 0")
        require(self.weight_decay >= 0, "teacher.adapt.weight_decay", "must be >= 0")
        require_seed(self.seed, "teacher.adapt.seed")


@dataclass(kw_only=True)
class TeacherConfig:
    """A BERT-family masked-LM teacher: hub name, local directory, or `minilm` (the offline package)."""

    name_or_path: str = "bert-base-uncased"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    adapt: AdaptConfig = field(default_factory=AdaptConfig)


@dataclass(kw_only=True)
class StudentConfig:
    """The student: initialised from the teacher's layers, randomly, or from a checkpoint directory."""

    init: str = "teacher"  # "teacher" | "random" | path to a DistilBERT checkpoint
    preset: str | None = None  # a students.PRESETS name; default: derived from the teacher
    n_layers: int | None = None  # default: half the teacher's
    layers: list[int] | None = None  # teacher layers copied into the student; default: the original scripts' choice
    dropout: float | None = None  # hidden and attention dropout; default: DistilBERT's 0.1

    def __post_init__(self) -> None:
        require(self.n_layers is None or self.n_layers > 0, "student.n_layers", "must be > 0")
        require(self.dropout is None or 0 <= self.dropout < 1, "student.dropout", "must be in [0, 1)")
        if self.layers is not None and self.n_layers is not None:
            require(len(self.layers) == self.n_layers, "student.layers", "must list student.n_layers layers")


@dataclass(kw_only=True)
class DataConfig:
    """A pretraining corpus. `source`: `wiki-summaries` (offline), `hub`, or `files`."""

    source: Literal["wiki-summaries", "hub", "files"] = "wiki-summaries"
    name: str | None = None  # hub dataset name, e.g. "wikimedia/wikipedia"
    config: str | None = None  # hub config, e.g. "20231101.en"
    split: str = "train"
    files: list[str] = field(default_factory=list)  # .txt / .jsonl / .json / .parquet
    text_field: str = "text"
    packing: bool = False  # fixed-length blocks; False: documents, length-grouped batches
    max_length: int = 128
    validation_fraction: float = 0.02
    max_validation_documents: int = 2000
    streaming: bool = False
    shuffle_buffer: int = 10_000
    num_proc: int = 2
    max_documents: int | None = None
    frequency_count_tokens: int = 10_000_000  # tokens counted for masking smoothing

    def __post_init__(self) -> None:
        require(8 <= self.max_length <= 8192, "data.max_length", "must be in [8, 8192]")
        require(0 < self.validation_fraction < 0.5, "data.validation_fraction", "must be in (0, 0.5)")
        require(self.num_proc >= 1, "data.num_proc", "must be >= 1")
        require(self.max_documents is None or self.max_documents >= 1, "data.max_documents",
                "must be >= 1 (or null for all)")
        require(self.max_validation_documents >= 1, "data.max_validation_documents", "must be >= 1")
        require(self.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")
        require(self.frequency_count_tokens >= 1, "data.frequency_count_tokens", "must be >= 1")
        if self.source == "hub":
            require(bool(self.name), "data.name", "is required when data.source is 'hub'")
        if self.source == "files":
            require(bool(self.files), "data.files", "must list at least one file when data.source is 'files'")


@dataclass(kw_only=True)
class MaskingConfig:
    """Dynamic MLM masking (BERT/DistilBERT): which positions, and what they become."""

    probability: float = 0.15
    mask_fraction: float = 0.8  # of the selected positions -> [MASK]
    random_fraction: float = 0.1  # -> a random token; the rest stay unchanged
    smoothing: float = 0.7  # selection weight count^-smoothing (Sanh et al.); 0 = uniform

    def __post_init__(self) -> None:
        require(0 < self.probability < 1, "masking.probability", "must be in (0, 1)")
        require(self.mask_fraction >= 0 and self.random_fraction >= 0, "masking.mask_fraction", "must be >= 0")
        require(self.mask_fraction + self.random_fraction <= 1, "masking.random_fraction",
               "mask_fraction + random_fraction must be <= 1")
        require(self.smoothing >= 0, "masking.smoothing", "must be >= 0")


@dataclass(kw_only=True)
class LossConfig:
    """Loss weights and temperature. The paper's triple loss: alpha_ce 5, alpha_mlm 2, alpha_cos 1, T 2."""

    alpha_ce: float = 5.0
    alpha_mlm: float = 2.0
    alpha_cos: float = 1.0
    alpha_mse: float = 0.0  # logit MSE
    alpha_hidden_mse: float = 0.0  # hidden-state MSE on layer_map (TinyBERT)
    alpha_attn: float = 0.0  # attention-distribution KL on layer_map (MiniLM / TinyBERT)
    temperature: float = 2.0
    restrict_ce_to_mask: bool = False
    # the soft-target term's divergence between teacher p and student q (distill.losses.divergence_rows):
    # forward_kl (the paper's), reverse_kl, jsd (generalised, mixture weight jsd_beta), tv
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "tv"] = "forward_kl"
    jsd_beta: float = 0.5
    # MiniLM v2 (Wang et al. 2021): Q-Q, K-K, V-V self-attention relations of one teacher layer
    # (relation_layer, 1-based; default its last) transferred to the student's last layer, split into
    # relation_heads (default: the teacher's attention heads; must divide both widths)
    alpha_relation: float = 0.0
    relation_heads: int | None = None
    relation_layer: int | None = None
    # MiniLM v1's value relation (same layers; the models' own heads, which must be equal in number);
    # v1 = alpha_value_relation + alpha_attn on the last layers
    alpha_value_relation: float = 0.0
    # Student layer -> teacher layer pairs (0 = embeddings, i = block i) for cos/hidden/attention losses.
    # None: cosine on the last layer only (the original scripts'); uniform map for the others.
    layer_map: list[list[int]] | None = None

    def __post_init__(self) -> None:
        weights = [self.alpha_ce, self.alpha_mlm, self.alpha_cos, self.alpha_mse, self.alpha_hidden_mse,
                   self.alpha_attn, self.alpha_relation, self.alpha_value_relation]
        require(all(w >= 0 for w in weights), "loss.alpha_ce", "loss weights must be >= 0")
        require(sum(weights) > 0, "loss.alpha_ce", "at least one loss weight must be > 0")
        require(self.temperature > 0, "loss.temperature", "must be > 0")
        require(self.relation_heads is None or self.relation_heads > 0, "loss.relation_heads", "must be > 0")
        require(self.relation_layer is None or self.relation_layer > 0, "loss.relation_layer",
                "must be a teacher layer >= 1")
        require(0 < self.jsd_beta < 1, "loss.jsd_beta", "must be in (0, 1) (0 and 1 are forward_kl and reverse_kl)")
        if self.layer_map is not None:
            require(all(len(p) == 2 for p in self.layer_map), "loss.layer_map", "must be [[student, teacher], ...]")


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation. batch_size is the global micro-batch (sequences per forward, all processes);
    one optimizer step sees batch_size * grad_accum sequences. Defaults: the AdamW of the original
    `distillation/` scripts."""

    max_steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.0
    warmup_fraction: float = 0.05
    clip_grad_norm: float = 5.0
    seed: int = 56
    # None: Accelerate's choice (`accelerate launch --mixed_precision`, its config file, or
    # ACCELERATE_MIXED_PRECISION; "no" without any); the run's recipe.yaml records what was used
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    num_workers: int = 0
    # threads per process on CPU; None: OMP_NUM_THREADS where set (not under `accelerate launch`), else the
    # cores this process may use, shared by its machine's processes (distill.mechanics.cpu_threads)
    cpu_threads: int | None = None
    # torch.compile each transformer block of student and teacher; auto: on for CUDA, off on CPUs (where it
    # measured no gain and costs a minute of compilation)
    compile: bool | Literal["auto"] = "auto"
    # the per-row arithmetic of the vocabulary losses: auto = triton on CUDA, eager on CPUs; "compiled" =
    # the eager ops fused by torch.compile (see distill.losses.VocabLossWeights)
    loss_kernel: Literal["auto", "eager", "compiled", "triton"] = "auto"
    peak_tflops: float | None = None  # per-device peak for MFU; default: distill.flops.PEAKS by device name
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20
    # mask draws over the eval batches (each draw masks the same blocks anew): a 95 % interval of ±0.3 points
    # at 27 % accuracy needs ~84K masked tokens; the offline corpus's ~100 validation blocks give ~3,100 per draw
    eval_mask_draws: int = 1
    # the held-out blocks' order and masks: fixed, not train.seed, so that runs of other training seeds score
    # the same tokens and their held-out differences pair token by token (56: the default seed's set)
    eval_seed: int = 56
    save_every: int = 200
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        require(self.max_steps > 0, "train.max_steps", "must be > 0")
        require(self.batch_size > 0, "train.batch_size", "must be > 0")
        require(self.grad_accum > 0, "train.grad_accum", "must be > 0")
        require(self.lr > 0, "train.lr", "must be > 0")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas", "must be two in [0, 1)")
        require(self.clip_grad_norm > 0, "train.clip_grad_norm", "must be > 0")
        require(self.cpu_threads is None or self.cpu_threads > 0, "train.cpu_threads",
                "must be > 0 (or null: the cores this process may use, shared by its processes)")
        require(self.eps > 0, "train.eps", "must be > 0")
        require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        require_seed(self.seed, "train.seed")
        require_seed(self.eval_seed, "train.eval_seed")
        require(0 <= self.warmup_fraction < 1, "train.warmup_fraction", "must be in [0, 1)")
        require(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
        require(self.peak_tflops is None or self.peak_tflops > 0, "train.peak_tflops", "must be > 0")
        for name in ("log_every", "eval_every", "save_every", "eval_batches", "eval_mask_draws"):
            require(getattr(self, name) > 0, f"train.{name}", "must be > 0")


@dataclass(kw_only=True)
class TrackingConfig:
    """wandb through Accelerate's trackers; metrics.jsonl in the run directory is always written."""

    wandb: bool = True
    project: str = "distilbert-kit"
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)
    # wandb group: a distillation and its fine-tunes share one. Default: the distillation's run directory
    # name (fine-tunes of runs/<name>/student or runs/<name>/teacher find it from that path)
    group: str | None = None
    log_model: bool = False  # upload the export (student / best classifier) as a wandb artifact


@dataclass(kw_only=True)
class HubConfig:
    """The export on the Hugging Face Hub: uploaded at the end of the run when push_to_hub is true."""

    push_to_hub: bool = False
    repo_id: str | None = None  # "owner/name"
    private: bool = True
    license: str | None = None  # the model card's licence (e.g. apache-2.0); unset: "other"

    def __post_init__(self) -> None:
        if self.push_to_hub:
            require(bool(self.repo_id) and re.fullmatch(r"[\w.-]+/[\w.-]+", self.repo_id or "") is not None,
                    "hub.repo_id", "must be 'owner/name' when hub.push_to_hub is true")


class _RecipeBase:
    kind: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


@dataclass(kw_only=True)
class Recipe(_RecipeBase):
    """A distillation run (distill.train)."""

    output_dir: str = "runs/default"
    tokenizer: str = "distilbert-base-uncased"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    hub: HubConfig = field(default_factory=HubConfig)

    kind: ClassVar[str] = "distill"


# ------------------------------------------------------------------------------------- fine-tuning
@dataclass(kw_only=True)
class TaskConfig:
    """Where the labelled data comes from. `source`: a preset name, `hub`, or `files`."""

    source: Literal["wiki-topics", "sst2", "imdb", "mrpc", "mnli", "hub", "files"] = "wiki-topics"
    name: str | None = None  # hub dataset (source: hub)
    config: str | None = None
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    splits: dict[str, str] = field(default_factory=dict)  # train/validation/test -> hub split or file path
    max_length: int = 128
    max_train_examples: int | None = None  # a deterministic subset of train (smoke tests, quick runs)

    def __post_init__(self) -> None:
        require(8 <= self.max_length <= 8192, "task.max_length", "must be in [8, 8192]")
        require(self.max_train_examples is None or self.max_train_examples >= 1, "task.max_train_examples",
                "must be >= 1 (or null for all)")
        unknown = sorted(set(self.splits) - {"train", "validation", "test"})
        require(not unknown, "task.splits", f"has unknown split names {unknown}; use train, validation, test")
        if self.source == "hub":
            require(bool(self.name), "task.name", "is required when task.source is 'hub'")
        if self.source == "files":
            missing = [s for s in ("train", "test") if s not in self.splits]
            require(not missing, "task.splits", f"must name files for {missing} when task.source is 'files' "
                    "(validation optional)")


@dataclass(kw_only=True)
class FinetuneTrainConfig:
    epochs: int = 3
    max_steps: int | None = None  # stop earlier than `epochs` if set
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    clip_grad_norm: float = 1.0
    seed: int = 42
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None  # None: Accelerate's choice (see TrainConfig)
    cpu_threads: int | None = None  # threads per process on CPU (see TrainConfig)
    eval_every: int | None = None  # steps; default: once per epoch
    patience: int = 2  # evaluations without validation improvement before stopping
    metric: Literal["accuracy", "macro_f1"] = "accuracy"
    log_every: int = 20

    def __post_init__(self) -> None:
        require(self.epochs > 0, "train.epochs", "must be > 0")
        require(self.batch_size > 0, "train.batch_size", "must be > 0")
        require(self.lr > 0, "train.lr", "must be > 0")
        require(self.patience >= 1, "train.patience", "must be >= 1")
        require(self.clip_grad_norm > 0, "train.clip_grad_norm", "must be > 0")
        require(self.cpu_threads is None or self.cpu_threads > 0, "train.cpu_threads",
                "must be > 0 (or null: the cores this process may use, shared by its processes)")
        require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        require_seed(self.seed, "train.seed")


@dataclass(kw_only=True)
class TaskDistillConfig:
    """Task-specific distillation from a fine-tuned classifier (None: plain fine-tuning)."""

    teacher: str | None = None
    alpha_ce: float = 0.5
    alpha_task: float = 0.5
    temperature: float = 2.0

    def __post_init__(self) -> None:
        require(self.alpha_ce >= 0 and self.alpha_task >= 0, "distill.alpha_ce",
                "and distill.alpha_task must be >= 0")
        require(self.alpha_ce + self.alpha_task > 0, "distill.alpha_ce", "+ distill.alpha_task must be > 0")
        require(self.temperature > 0, "distill.temperature", "must be > 0")


@dataclass(kw_only=True)
class FinetuneRecipe(_RecipeBase):
    """A fine-tuning run (distill.downstream.finetune), optionally with task-specific distillation."""

    kind: ClassVar[str] = "finetune"
    output_dir: str = "runs/finetune"
    model: str = "runs/wiki/student"  # a student export, a transformers checkpoint, or a hub name
    tokenizer: str | None = None  # default: the model's own directory
    task: TaskConfig = field(default_factory=TaskConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    distill: TaskDistillConfig = field(default_factory=TaskDistillConfig)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(tags=["finetune"]))
    hub: HubConfig = field(default_factory=HubConfig)



def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise RecipeError(f"{key} {message}")


def require_seed(seed: int, key: str) -> None:
    # what every generator seeded from it accepts (NumPy's legacy seeding, which accelerate.set_seed calls,
    # refuses negatives and anything from 2**32 on)
    require(0 <= seed < 2**32, key, f"must be in [0, 2**32), got {seed}")


RECIPE_KINDS: dict[str, type] = {"distill": Recipe, "finetune": FinetuneRecipe}
