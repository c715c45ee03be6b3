"""The DistilBERT student, read top to bottom: leaf modules first, task heads last.

Architecture from Sanh et al. 2019 (arXiv 1910.01108): a BERT encoder without token-type embeddings or
pooler, post-LayerNorm residual blocks, learned (or sinusoidal) position embeddings. Parameter names are
those of `transformers.DistilBertFor*` verbatim, so `state_dict()` loads into transformers with
`strict=True` and the other way round; `save_pretrained` writes a directory transformers reads.

Shapes: B batch, T sequence length, C model width (`config.dim`), nh heads, hs head size, V vocabulary.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DistilBertConfig
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput, SequenceClassifierOutput

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
LEGACY_WEIGHTS_NAME = "pytorch_model.bin"


class LayerNorm(nn.LayerNorm):
    """LayerNorm with DistilBERT's epsilon (1e-12, fixed in transformers' implementation too)."""

    def __init__(self, dim: int, eps: float = 1e-12):
        super().__init__(dim, eps=eps)


class GELU(nn.Module):
    """Exact (erf) GELU, as transformers' `"gelu"` activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x)


def sinusoidal_position_table(n_pos: int, dim: int) -> torch.Tensor:
    """Vaswani et al. 2017 position table, computed in float64 as transformers does, then cast."""
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]  # (P, 1)
    j = torch.arange(dim, dtype=torch.float64)[None, :]  # (1, C)
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)  # (P, C)
    table = torch.empty(n_pos, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle[:, 0::2])
    table[:, 1::2] = torch.cos(angle[:, 1::2])
    return table.float()


class Embeddings(nn.Module):
    """Token + position embeddings, LayerNorm, dropout. No token-type (segment) embeddings."""

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.dim, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.dim)
        if config.sinusoidal_pos_embds:
            self.position_embeddings.weight.requires_grad_(False)
        self.LayerNorm = LayerNorm(config.dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        T = input_ids.size(1)
        if T > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"sequence length {T} exceeds max_position_embeddings={self.position_embeddings.num_embeddings}; "
                "truncate the input or use a config with more positions"
            )
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)[None, :]  # (1, T)
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)  # (B, T, C)
        return self.dropout(self.LayerNorm(x))


class MultiHeadAttention(nn.Module):
    """Bidirectional multi-head self-attention with a key padding mask.

    Runs `F.scaled_dot_product_attention` (fused kernels) unless the attention probabilities are asked
    for (attention-transfer objectives such as MiniLM/TinyBERT), in which case it computes them
    explicitly; both paths give the same output.
    """

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        if config.dim % config.n_heads != 0:
            raise ValueError(f"config.n_heads={config.n_heads} must divide config.dim={config.dim}")
        self.n_heads = config.n_heads
        self.head_size = config.dim // config.n_heads
        self.q_lin = nn.Linear(config.dim, config.dim)
        self.k_lin = nn.Linear(config.dim, config.dim)
        self.v_lin = nn.Linear(config.dim, config.dim)
        self.out_lin = nn.Linear(config.dim, config.dim)
        self.dropout = nn.Dropout(config.attention_dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, T, C); mask: (B, 1, 1, T) bool, True where a key may be attended, or None for no padding."""
        B, T, C = x.shape
        q = self.q_lin(x).view(B, T, self.n_heads, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_lin(x).view(B, T, self.n_heads, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v_lin(x).view(B, T, self.n_heads, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        if output_attentions:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_size)  # (B, nh, T, T)
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            probs = scores.softmax(dim=-1)  # (B, nh, T, T)
            y = self.dropout(probs) @ v  # (B, nh, T, hs)
        else:
            probs = None
            dropout_p = self.dropout.p if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.out_lin(y), probs


class FeedForward(nn.Module):
    """Position-wise MLP: lin1 -> activation -> lin2 -> dropout."""

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        if config.activation not in ("gelu", "relu"):
            raise ValueError(f"config.activation={config.activation!r} is not supported; use 'gelu' or 'relu'")
        self.lin1 = nn.Linear(config.dim, config.hidden_dim)
        self.activation = GELU() if config.activation == "gelu" else nn.ReLU()
        self.lin2 = nn.Linear(config.hidden_dim, config.dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.lin2(self.activation(self.lin1(x))))  # (B, T, C)


class TransformerEncoderBlock(nn.Module):
    """Post-LN block (as BERT): x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.attention = MultiHeadAttention(config)
        self.sa_layer_norm = LayerNorm(config.dim)
        self.ffn = FeedForward(config)
        self.output_layer_norm = LayerNorm(config.dim)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, probs = self.attention(x, mask, output_attentions)
        x = self.sa_layer_norm(a + x)  # (B, T, C)
        x = self.output_layer_norm(self.ffn(x) + x)  # (B, T, C)
        return x, probs


class Transformer(nn.Module):
    """The stack of blocks (named `transformer.layer.{i}` as in transformers)."""

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.layer = nn.ModuleList([TransformerEncoderBlock(config) for _ in range(config.n_layers)])


class DistilBERTPreTrainedModel(nn.Module):
    """Config holder, weight init and the Hugging Face directory format (config.json + model.safetensors)."""

    # Keys of this class's task head; a checkpoint of another task (or of the bare encoder) lacks them.
    head_keys: tuple[str, ...] = ()
    # Head names of every task, to tell another task's head from a genuinely unexpected tensor.
    all_head_keys = ("vocab_transform", "vocab_layer_norm", "vocab_projector", "pre_classifier", "classifier")
    tied_keys: dict[str, str] = {}
    hf_architecture = "DistilBertModel"

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.config = config

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Same scheme as transformers' DistilBertPreTrainedModel._init_weights."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        if isinstance(module, Embeddings) and self.config.sinusoidal_pos_embds:
            module.position_embeddings.weight.copy_(
                sinusoidal_position_table(self.config.max_position_embeddings, self.config.dim)
            )

    def post_init(self) -> None:
        self.apply(self._init_weights)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the tensors named in `tied_keys` (output projection = input embeddings)."""
        for dst, src in self.tied_keys.items():
            dst_mod, dst_name = self._module_and_name(dst)
            src_mod, src_name = self._module_and_name(src)
            setattr(dst_mod, dst_name, getattr(src_mod, src_name))

    def _module_and_name(self, key: str) -> tuple[nn.Module, str]:
        path, _, name = key.rpartition(".")
        return self.get_submodule(path), name

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write config.json and model.safetensors, readable by `transformers.AutoModel*.from_pretrained`."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        config = self.config.__class__.from_dict(self.config.to_dict())
        config.architectures = [self.hf_architecture]
        config.save_pretrained(out)
        # Tied tensors are stored once (safetensors refuses shared storage), as transformers does.
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items() if k not in self.tied_keys}
        tmp = out / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o644)  # safetensors creates files private to the user; a model directory is shared
        tmp.replace(out / WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **config_overrides) -> DistilBERTPreTrainedModel:
        """Load a directory (ours or transformers') or a hub name with a DistilBERT checkpoint.

        A task head that the checkpoint lacks (e.g. a classifier on top of a distilled MLM student) is
        freshly initialised and logged; the other task's head, if present, is dropped and logged. Any
        other missing, unexpected or mis-shaped tensor is an error.
        """
        directory = resolve_model_dir(name_or_path)
        config = DistilBertConfig.from_pretrained(directory, **config_overrides)
        if config.model_type != "distilbert":
            raise ValueError(f"{name_or_path} holds a {config.model_type!r} model, not a DistilBERT one")
        model = cls(config)
        model.load_hf_state_dict(read_state_dict(directory), source=str(name_or_path))
        return model

    def load_hf_state_dict(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load a transformers-style DistilBERT state dict with the checks described in `from_pretrained`."""
        own = self.state_dict()
        prefix = "distilbert."
        if not any(k.startswith(prefix) for k in state):  # a bare DistilBertModel checkpoint
            state = {(k if k in self.all_head_keys else prefix + k): v for k, v in state.items()}
        if not any(k.startswith(prefix) for k in own):  # loading into the bare encoder
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        dropped = sorted(k for k in state if k not in own and k.split(".")[0] in self.all_head_keys)
        unexpected = sorted(k for k in state if k not in own and k not in dropped)
        missing = sorted(k for k in own if k not in state and k not in self.tied_keys)
        fresh = [k for k in missing if k.split(".")[0] in self.head_keys]
        missing = [k for k in missing if k not in fresh]
        if missing or unexpected:
            raise ValueError(f"{source}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
        for k, v in state.items():
            if k in own and own[k].shape != v.shape:
                raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
        if dropped:
            logger.info("%s: not used by %s: %s", source, type(self).__name__, dropped)
        if fresh:
            logger.info("%s: newly initialised in %s: %s", source, type(self).__name__, fresh)
        self.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        self.tie_weights()


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A local directory as is; otherwise a hub repository, downloaded (or read from the HF cache)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/")):
        raise FileNotFoundError(f"{name_or_path} is not a model directory")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.bin", "*.txt"]
    return Path(snapshot_download(str(name_or_path), allow_patterns=patterns))


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Read model.safetensors (or the legacy pytorch_model.bin) from a checkpoint directory."""
    if (directory / WEIGHTS_NAME).exists():
        return load_file(str(directory / WEIGHTS_NAME))
    if (directory / LEGACY_WEIGHTS_NAME).exists():
        return torch.load(directory / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{directory} has neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME}")


class DistilBERTModel(DistilBERTPreTrainedModel):
    """The bare encoder: returns the last hidden state and, on request, all hidden states / attentions."""

    hf_architecture = "DistilBertModel"

    def __init__(self, config: DistilBertConfig):
        super().__init__(config)
        self.embeddings = Embeddings(config)
        self.transformer = Transformer(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> BaseModelOutput:
        """input_ids: (B, T); attention_mask: (B, T), 1 for real tokens, 0 for padding.

        hidden_states (on request) is a tuple of n_layers + 1 tensors (B, T, C): the embedding output then
        every block's output, as in transformers; attentions is a tuple of (B, nh, T, T) probabilities.
        """
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        x = self.embeddings(input_ids, position_ids)  # (B, T, C)
        hidden_states = [x] if output_hidden_states else None
        attentions = [] if output_attentions else None
        for block in self.transformer.layer:
            x, probs = block(x, mask, output_attentions)
            if output_hidden_states:
                hidden_states.append(x)
            if output_attentions:
                attentions.append(probs)
        return BaseModelOutput(
            last_hidden_state=x,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )


class DistilBERTForMaskedLM(DistilBERTPreTrainedModel):
    """Encoder + MLM head (vocab_transform -> GELU -> vocab_layer_norm -> vocab_projector tied to the
    word embeddings). `predict_tokens` applies the head to any hidden rows, so distillation can score only
    the positions it needs instead of all B*T*V logits."""

    head_keys = ("vocab_transform", "vocab_layer_norm", "vocab_projector")
    tied_keys = {"vocab_projector.weight": "distilbert.embeddings.word_embeddings.weight"}
    hf_architecture = "DistilBertForMaskedLM"

    def __init__(self, config: DistilBertConfig):
        super().__init__(config)
        self.distilbert = DistilBERTModel(config)
        self.vocab_transform = nn.Linear(config.dim, config.dim)
        self.activation = GELU() if config.activation == "gelu" else nn.ReLU()
        self.vocab_layer_norm = LayerNorm(config.dim)
        self.vocab_projector = nn.Linear(config.dim, config.vocab_size)
        self.post_init()

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head up to (excluding) the vocabulary projection: (..., C) -> (..., C)."""
        return self.vocab_layer_norm(self.activation(self.vocab_transform(hidden)))

    def predict_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """MLM logits for any hidden rows: (..., C) -> (..., V)."""
        return self.vocab_projector(self.transform(hidden))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> MaskedLMOutput:
        """labels: (B, T) token ids at the masked positions, -100 elsewhere; gives `.loss` (mean CE)."""
        out = self.distilbert(input_ids, attention_mask, position_ids, output_hidden_states, output_attentions)
        logits = self.predict_tokens(out.last_hidden_state)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


class DistilBERTForSequenceClassification(DistilBERTPreTrainedModel):
    """Encoder + classifier on the [CLS] state: pre_classifier -> ReLU -> dropout -> classifier.

    `config.num_labels == 1` is regression (MSE), otherwise single-label classification (cross-entropy).
    """

    head_keys = ("pre_classifier", "classifier")
    hf_architecture = "DistilBertForSequenceClassification"

    def __init__(self, config: DistilBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.distilbert = DistilBERTModel(config)
        self.pre_classifier = nn.Linear(config.dim, config.dim)
        self.classifier = nn.Linear(config.dim, config.num_labels)
        self.dropout = nn.Dropout(config.seq_classif_dropout)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> SequenceClassifierOutput:
        out = self.distilbert(input_ids, attention_mask, position_ids, output_hidden_states, output_attentions)
        cls = out.last_hidden_state[:, 0]  # (B, C)
        logits = self.classifier(self.dropout(F.relu(self.pre_classifier(cls))))  # (B, num_labels)
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.float())
            else:
                loss = F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )
