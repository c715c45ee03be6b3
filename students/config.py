"""Student configurations: named presets, configs derived from a teacher, parameter counts.

Configs are `transformers.DistilBertConfig` objects, so what we save is what transformers reads.
"""

from __future__ import annotations

import difflib

from torch import nn
from transformers import DistilBertConfig, PretrainedConfig

# name -> DistilBertConfig fields. "distilbert-base-uncased (66M)" is the paper's student.
PRESETS: dict[str, dict] = {
    "distilbert-base-uncased (66M)": dict(
        vocab_size=30522, dim=768, n_layers=6, n_heads=12, hidden_dim=3072, max_position_embeddings=512
    ),
    # Half-depth students of the offline teacher (all-MiniLM-L6-v2: 6 x 384, 12 heads, FFN 1536).
    "minilm-l3-h384 (student)": dict(
        vocab_size=30522, dim=384, n_layers=3, n_heads=12, hidden_dim=1536, max_position_embeddings=512
    ),
    "minilm-l6-h384": dict(
        vocab_size=30522, dim=384, n_layers=6, n_heads=12, hidden_dim=1536, max_position_embeddings=512
    ),
    # For tests and smoke runs.
    "tiny": dict(vocab_size=30522, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=512),
}


def create_model_config(name: str, **overrides) -> DistilBertConfig:
    """A `DistilBertConfig` from a preset name, with optional field overrides (e.g. `n_layers=4`)."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown model config {name!r}{hint}; valid names: {', '.join(map(repr, PRESETS))}")
    return DistilBertConfig(**{**PRESETS[name], **overrides})


def half_depth(n_teacher_layers: int) -> int:
    """The default student depth: half the teacher's, at least one layer (DistilBERT: 12 -> 6)."""
    return max(1, n_teacher_layers // 2)


def config_from_teacher(teacher_config: PretrainedConfig, n_layers: int | None = None) -> DistilBertConfig:
    """A student config with the teacher's width, heads, FFN size, vocabulary and positions, and half its
    depth unless `n_layers` is given. Refuses teachers whose blocks DistilBERT cannot represent."""
    c = teacher_config
    if getattr(c, "hidden_act", "gelu") not in ("gelu", "relu"):
        raise ValueError(f"teacher hidden_act={c.hidden_act!r}: the DistilBERT student supports 'gelu' or 'relu'")
    if abs(getattr(c, "layer_norm_eps", 1e-12) - 1e-12) > 1e-15:
        raise ValueError(f"teacher layer_norm_eps={c.layer_norm_eps}: the DistilBERT student uses 1e-12")
    if getattr(c, "position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"teacher position_embedding_type={c.position_embedding_type!r}: only 'absolute' is supported")
    n_layers = n_layers if n_layers is not None else half_depth(c.num_hidden_layers)
    return DistilBertConfig(
        vocab_size=c.vocab_size,
        dim=c.hidden_size,
        n_layers=n_layers,
        n_heads=c.num_attention_heads,
        hidden_dim=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings,
        activation=c.hidden_act,
        pad_token_id=c.pad_token_id if c.pad_token_id is not None else 0,
    )


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameters (tied tensors counted once), as transformers' `num_parameters()`."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
