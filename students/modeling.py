"""The DistilBERT student, read top to bottom: leaf modules first, task heads last.

Architecture from Sanh et al. 2019 (arXiv 1910.01108): a BERT encoder without token-type embeddings or
pooler, post-LayerNorm residual blocks, learned (or sinusoidal) position embeddings. Parameter names are
those of `transformers.DistilBertFor*` verbatim, so `state_dict()` loads into transformers with
`strict=True` and the other way round; `save_pretrained` writes a directory transformers reads.

Shapes: B batch, T sequence length, C model width (`config.dim`), nh heads, hs head size, V vocabulary.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DistilBertConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput, SequenceClassifierOutput

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------- token layout
@dataclass
class TokenLayout:
    """Where the real tokens of a right-padded (B, T) batch are, so an encoder can run on them alone.

    Hidden states in this layout are rows (N, C), N real tokens in batch order; only attention needs the
    sequence structure (`attend_rows`). Built on the host from the CPU attention mask (`from_mask`), so the
    device never has to be asked how many tokens a batch holds. `index` is None when nothing is padded
    (packed blocks): rows are then a plain view of (B * T, C).
    """

    batch: int
    seq: int
    n_tokens: int  # N
    max_len: int  # longest real sequence
    positions: torch.Tensor  # (N,) position ids
    cu_seqlens: torch.Tensor  # (B + 1,) int32 cumulative lengths
    index: torch.Tensor | None = None  # (N,) flat positions of the real tokens in B * T; None: no padding
    key_mask: torch.Tensor | None = None  # (B, 1, 1, T) bool, True at real keys; None: no padding
    flash: bool = False  # on a device with the variable-length flash kernel (set by `to`)

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> TokenLayout:
        """From a (B, T) 0/1 mask of right-padded sequences (every row: ones, then zeros), on the CPU."""
        if attention_mask.device.type != "cpu":
            raise ValueError("TokenLayout.from_mask needs the CPU attention mask (it is read on the host)")
        mask = attention_mask.bool()
        B, T = mask.shape
        lengths = mask.sum(1)
        if bool((lengths == 0).any()):
            raise ValueError("a sequence of the batch has no real token (empty attention_mask row)")
        if not torch.equal(mask, torch.arange(T)[None, :] < lengths[:, None]):
            raise ValueError("attention_mask must be right-padded: each row's real tokens first, then padding")
        n = int(lengths.sum())
        cu = torch.zeros(B + 1, dtype=torch.int32)
        cu[1:] = lengths.cumsum(0)
        padded = n < B * T
        positions = torch.arange(T).expand(B, T)[mask] if padded else torch.arange(T).repeat(B)
        return cls(batch=B, seq=T, n_tokens=n, max_len=int(lengths.max()), positions=positions, cu_seqlens=cu,
                   index=mask.view(-1).nonzero().squeeze(1) if padded else None,
                   key_mask=mask[:, None, None, :] if padded else None)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TokenLayout:
        def move(x):
            return None if x is None else x.to(device, non_blocking=non_blocking)

        device = torch.device(device)
        flash = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
        return replace(self, positions=move(self.positions), cu_seqlens=move(self.cu_seqlens),
                       index=move(self.index), key_mask=move(self.key_mask), flash=flash)

    def pin_memory(self) -> TokenLayout:
        def pin(x):
            return None if x is None else x.pin_memory()

        return replace(self, positions=pin(self.positions), cu_seqlens=pin(self.cu_seqlens), index=pin(self.index),
                       key_mask=pin(self.key_mask))

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...): the real tokens' entries."""
        flat = x.reshape(self.batch * self.seq, *x.shape[2:])
        return flat if self.index is None else flat.index_select(0, self.index)

    def scatter(self, rows: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...), zeros at padding."""
        if self.index is None:
            return rows.reshape(self.batch, self.seq, *rows.shape[1:])
        out = rows.new_zeros(self.batch * self.seq, *rows.shape[1:]).index_copy(0, self.index, rows)
        return out.view(self.batch, self.seq, *rows.shape[1:])


def flash_varlen_supported(q: torch.Tensor, layout: TokenLayout) -> bool:
    """Whether `attend_rows` can use the variable-length flash kernel for these rows: a CUDA device of
    compute capability 8.0+ (decided on the host, `TokenLayout.to`), fp16/bf16, head size a multiple of 8
    up to 256. Everything here is known when torch.compile traces, so it adds no guard on device state."""
    return layout.flash and q.dtype in (torch.float16, torch.bfloat16) and q.size(-1) % 8 == 0 and q.size(-1) <= 256


def attend_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                dropout_p: float = 0.0) -> torch.Tensor:
    """Bidirectional attention within each sequence for rows q, k, v (N, nh, hs) -> (N, nh, hs).

    No padding: one dense SDPA call with no mask (the flash kernel on GPUs). Padding, on GPUs: the
    variable-length flash kernel on the real tokens (`cu_seqlens`), so neither attention nor anything else
    runs on padding. Otherwise (CPU, fp32): the rows are scattered into (B, T) for one masked SDPA call and
    gathered back. Every path supports dropout.
    """
    if layout.index is not None and flash_varlen_supported(q, layout):
        out = torch.ops.aten._flash_attention_forward(q, k, v, layout.cu_seqlens, layout.cu_seqlens, layout.max_len,
                                                      layout.max_len, dropout_p, False, False)
        return out[0]
    qs, ks, vs = (layout.scatter(x).transpose(1, 2) for x in (q, k, v))  # (B, nh, T, hs)
    y = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=layout.key_mask, dropout_p=dropout_p)
    return layout.gather(y.transpose(1, 2))  # (N, nh, hs)


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

    def rows(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Embeddings of token rows: input_ids, positions (N,) -> (N, C)."""
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
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
        self, x: torch.Tensor, mask: torch.Tensor | None, output_attentions: bool = False,
        layout: TokenLayout | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, T, C); mask: (B, 1, 1, T) bool, True where a key may be attended, or None for no padding.
        With a `layout`, x holds token rows (N, C) instead (see `TokenLayout`), and mask is unused."""
        if layout is not None:
            N, C = x.shape
            q = self.q_lin(x).view(N, self.n_heads, self.head_size)  # (N, nh, hs)
            k = self.k_lin(x).view(N, self.n_heads, self.head_size)
            v = self.v_lin(x).view(N, self.n_heads, self.head_size)
            y = attend_rows(q, k, v, layout, self.dropout.p if self.training else 0.0)  # (N, nh, hs)
            return self.out_lin(y.reshape(N, C)), None
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
        self, x: torch.Tensor, mask: torch.Tensor | None, output_attentions: bool = False,
        layout: TokenLayout | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, T, C) with `mask`, or token rows (N, C) with a `layout` (everything but attention is
        per token, so it runs on the rows unchanged)."""
        a, probs = self.attention(x, mask, output_attentions, layout)
        x = self.sa_layer_norm(a + x)  # (B, T, C)
        x = self.output_layer_norm(self.ffn(x) + x)  # (B, T, C)
        return x, probs


class Transformer(nn.Module):
    """The stack of blocks (named `transformer.layer.{i}` as in transformers)."""

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.layer = nn.ModuleList([TransformerEncoderBlock(config) for _ in range(config.n_layers)])


class DistilBERTPreTrainedModel(PreTrainedModel):
    """`transformers.PreTrainedModel` with our modules and transformers' DistilBERT parameter names, so
    `save_pretrained`, `from_pretrained` (every option), `push_to_hub`, dtype handling and the rest are the
    library's. What we add: `from_pretrained` refuses a checkpoint that lacks encoder tensors or has
    tensors that belong to no DistilBERT head (transformers would only log them); `save_pretrained` names
    transformers' architecture in config.json, so tools that read it load transformers' own class; and
    config overrides as keyword arguments (`DistilBERTForSequenceClassification(config, num_labels=3)`)."""

    config_class = DistilBertConfig
    base_model_prefix = "distilbert"
    main_input_name = "input_ids"
    _supports_sdpa = True  # attention is our own (SDPA); the flag lets transformers accept any config
    # Keys of this class's task head; a checkpoint of another task (or of the bare encoder) lacks them.
    head_keys: tuple[str, ...] = ()
    # Head names of every task, to tell another task's head from a genuinely unexpected tensor.
    all_head_keys = ("vocab_transform", "vocab_layer_norm", "vocab_projector", "pre_classifier", "classifier")
    tied_keys: dict[str, str] = {}
    hf_architecture = "DistilBertModel"

    def __init__(self, config: DistilBertConfig, **config_overrides):
        if config_overrides:
            config = copy.deepcopy(config)
            for key, value in config_overrides.items():
                if not hasattr(config, key):
                    raise TypeError(f"{type(self).__name__}: {key!r} is not a DistilBertConfig field")
                setattr(config, key, value)
        super().__init__(config)

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

    def tie_weights(self, *args, **kwargs) -> None:
        """Share the tensors named in `tied_keys` (output projection = input embeddings)."""
        for dst, src in self.tied_keys.items():
            dst_mod, dst_name = self._module_and_name(dst)
            src_mod, src_name = self._module_and_name(src)
            setattr(dst_mod, dst_name, getattr(src_mod, src_name))

    def _module_and_name(self, key: str) -> tuple[nn.Module, str]:
        path, _, name = key.rpartition(".")
        return self.get_submodule(path), name

    def save_pretrained(self, save_directory: str | Path, *args, **kwargs):
        """transformers' save_pretrained; config.json names transformers' class (`DistilBertForMaskedLM`...)
        rather than ours, so any tool that reads `architectures` finds a class it has."""
        out = super().save_pretrained(save_directory, *args, **kwargs)
        for f in Path(save_directory).glob("*.safetensors"):
            f.chmod(0o644)  # safetensors writes files private to the user; a model directory is shared
        path = Path(save_directory) / "config.json"
        if path.exists():
            config = json.loads(path.read_text())
            config["architectures"] = [self.hf_architecture]
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return out

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *args, **kwargs):
        """transformers' from_pretrained (a directory, ours or transformers', or a hub name; any of its
        options), then the checks described in the class docstring. A task head the checkpoint lacks (a
        classifier on a distilled MLM student) is freshly initialised and logged; another task's head is
        dropped and logged."""
        wants_info = kwargs.pop("output_loading_info", False)
        if isinstance(name_or_path, (str, Path)) and (Path(name_or_path).exists()
                                                      or str(name_or_path).startswith((".", "/"))):
            if not Path(name_or_path).is_dir():
                raise FileNotFoundError(f"{name_or_path} is not a model directory")
        model, info = super().from_pretrained(name_or_path, *args, output_loading_info=True, **kwargs)
        if model.config.model_type != "distilbert":
            raise ValueError(f"{name_or_path} holds a {model.config.model_type!r} model, not a DistilBERT one")
        heads = set(cls.head_keys)
        missing = sorted(k for k in info["missing_keys"] if k.split(".")[0] not in heads and k not in cls.tied_keys)
        unexpected = sorted(k for k in info["unexpected_keys"] if k.split(".")[0] not in cls.all_head_keys)
        if missing or unexpected:
            raise ValueError(f"{name_or_path}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
        if info["mismatched_keys"]:
            raise ValueError(f"{name_or_path}: tensors of another shape: {list(info['mismatched_keys'])[:3]}")
        return (model, info) if wants_info else model


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A local directory as is; otherwise a hub repository, downloaded (or read from the HF cache)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/")):
        raise FileNotFoundError(f"{name_or_path} is not a model directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(str(name_or_path))
    except HFValidationError:
        raise FileNotFoundError(f"{name_or_path} is not a model directory (nor a Hub model id)") from None

    patterns = ["*.json", "*.safetensors", "*.bin", "*.txt"]
    return Path(snapshot_download(str(name_or_path), allow_patterns=patterns))


class DistilBERTModel(DistilBERTPreTrainedModel):
    """The bare encoder: returns the last hidden state and, on request, all hidden states / attentions."""

    hf_architecture = "DistilBertModel"

    def __init__(self, config: DistilBertConfig, **config_overrides):
        super().__init__(config, **config_overrides)
        config = self.config
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

    def forward_rows(self, input_ids: torch.Tensor, layout: TokenLayout) -> tuple[torch.Tensor, ...]:
        """Every hidden state (embeddings first) of the real tokens only: n_layers + 1 tensors (N, C).

        input_ids: (B, T) padded as `layout` says. No compute is spent on padding (linear layers, norms and
        activations run on the N rows; attention as `attend_rows`), and nothing here waits for the device.
        """
        x = self.embeddings.rows(layout.gather(input_ids), layout.positions)  # (N, C)
        hidden_states = [x]
        for block in self.transformer.layer:
            x, _ = block(x, None, False, layout)
            hidden_states.append(x)
        return tuple(hidden_states)


class DistilBERTTaskModel(DistilBERTPreTrainedModel):
    """The encoder plus a task head. Subclasses give `head` (last hidden state -> logits), `task_loss` and
    `output_type`; the forward pass is the same for every task."""

    output_type: type = BaseModelOutput

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ):
        """input_ids, attention_mask: (B, T); labels as the task defines them; gives `.loss` with labels."""
        out = self.distilbert(input_ids, attention_mask, position_ids, output_hidden_states, output_attentions)
        logits = self.head(out.last_hidden_state)
        loss = None if labels is None else self.task_loss(logits, labels)
        return self.output_type(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


class DistilBERTForMaskedLM(DistilBERTTaskModel):
    """Encoder + MLM head (vocab_transform -> GELU -> vocab_layer_norm -> vocab_projector tied to the
    word embeddings). `encode` and `predict_tokens` apply the encoder and the head separately (the masked-LM
    protocol of distill.metrics), so distillation and evaluation score only the positions they need instead
    of all B*T*V logits."""

    head_keys = ("vocab_transform", "vocab_layer_norm", "vocab_projector")
    tied_keys = {"vocab_projector.weight": "distilbert.embeddings.word_embeddings.weight"}
    _tied_weights_keys = tied_keys
    hf_architecture = "DistilBertForMaskedLM"
    output_type = MaskedLMOutput

    def __init__(self, config: DistilBertConfig, **config_overrides):
        super().__init__(config, **config_overrides)
        config = self.config
        self.distilbert = DistilBERTModel(config)
        self.vocab_transform = nn.Linear(config.dim, config.dim)
        self.activation = GELU() if config.activation == "gelu" else nn.ReLU()
        self.vocab_layer_norm = LayerNorm(config.dim)
        self.vocab_projector = nn.Linear(config.dim, config.vocab_size)
        self.post_init()

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The last hidden state (B, T, C)."""
        return self.distilbert(input_ids, attention_mask).last_hidden_state

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head up to (excluding) the vocabulary projection: (..., C) -> (..., C)."""
        return self.vocab_layer_norm(self.activation(self.vocab_transform(hidden)))

    def predict_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """MLM logits for any hidden rows: (..., C) -> (..., V)."""
        return self.vocab_projector(self.transform(hidden))

    head = predict_tokens  # (B, T, C) -> (B, T, V)

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the masked positions; labels (B, T): token ids there, -100 elsewhere."""
        return F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=-100)


class DistilBERTForSequenceClassification(DistilBERTTaskModel):
    """Encoder + classifier on the [CLS] state: pre_classifier -> ReLU -> dropout -> classifier.

    `config.num_labels == 1` is regression (MSE), otherwise single-label classification (cross-entropy).
    """

    head_keys = ("pre_classifier", "classifier")
    hf_architecture = "DistilBertForSequenceClassification"
    output_type = SequenceClassifierOutput

    def __init__(self, config: DistilBertConfig, **config_overrides):
        super().__init__(config, **config_overrides)
        config = self.config
        self.num_labels = config.num_labels
        self.distilbert = DistilBERTModel(config)
        self.pre_classifier = nn.Linear(config.dim, config.dim)
        self.classifier = nn.Linear(config.dim, config.num_labels)
        self.dropout = nn.Dropout(config.seq_classif_dropout)
        self.post_init()

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        cls = hidden[:, 0]  # (B, C)
        return self.classifier(self.dropout(F.relu(self.pre_classifier(cls))))  # (B, num_labels)

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """labels (B,): class ids (cross-entropy), or targets when num_labels == 1 (MSE)."""
        if self.num_labels == 1:
            return F.mse_loss(logits.squeeze(-1), labels.float())
        return F.cross_entropy(logits, labels)
