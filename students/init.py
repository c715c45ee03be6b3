"""Initialise a DistilBERT student from a BERT masked-LM teacher: one key-mapping table plus a layer list.

As `extract_distilbert.py` of Hugging Face's original `distillation/` scripts: word/position embeddings, the
embedding LayerNorm, the MLM head and a subset of the teacher's layers are copied. Unlike those scripts, the
teacher's token-type embedding row 0 (the one every single-segment input adds) is folded into the student's
position embeddings, so the student's embedding output equals the teacher's exactly instead of starting
shifted.
"""

from __future__ import annotations

import torch
from transformers import BertForMaskedLM, DistilBertConfig

from students.config import config_from_teacher, half_depth
from students.modeling import DistilBERTForMaskedLM

# student key -> teacher key, for the embeddings and the MLM head.
EMBEDDING_AND_HEAD_MAP = {
    "distilbert.embeddings.word_embeddings.weight": "bert.embeddings.word_embeddings.weight",
    "distilbert.embeddings.position_embeddings.weight": "bert.embeddings.position_embeddings.weight",
    "distilbert.embeddings.LayerNorm.weight": "bert.embeddings.LayerNorm.weight",
    "distilbert.embeddings.LayerNorm.bias": "bert.embeddings.LayerNorm.bias",
    "vocab_transform.weight": "cls.predictions.transform.dense.weight",
    "vocab_transform.bias": "cls.predictions.transform.dense.bias",
    "vocab_layer_norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "vocab_layer_norm.bias": "cls.predictions.transform.LayerNorm.bias",
    "vocab_projector.bias": "cls.predictions.bias",
}

# student block sub-key -> teacher layer sub-key (each with .weight and .bias).
LAYER_MAP = {
    "attention.q_lin": "attention.self.query",
    "attention.k_lin": "attention.self.key",
    "attention.v_lin": "attention.self.value",
    "attention.out_lin": "attention.output.dense",
    "sa_layer_norm": "attention.output.LayerNorm",
    "ffn.lin1": "intermediate.dense",
    "ffn.lin2": "output.dense",
    "output_layer_norm": "output.LayerNorm",
}

# Teacher tensors deliberately not copied, and why.
DROPPED = {
    "bert.embeddings.token_type_embeddings.weight": "row 0 folded into position embeddings; rows 1+ unused",
    "cls.predictions.decoder.weight": "tied to the word embeddings (the student ties them too)",
    "cls.predictions.decoder.bias": "the same tensor as cls.predictions.bias",
    "bert.pooler.dense.weight": "no pooler in DistilBERT",
    "bert.pooler.dense.bias": "no pooler in DistilBERT",
}
TOKEN_TYPE_KEY = "bert.embeddings.token_type_embeddings.weight"


def default_layers(n_teacher: int, n_student: int) -> list[int]:
    """Teacher layers for an n_student-layer student: evenly spaced from the first to the last layer.

    For 6 of 12 this is exactly the original scripts' [0, 2, 4, 7, 9, 11] (every other layer, ending on the last,
    whose output the cosine loss aligns); [0, 2, 5] for 3 of 6, [0, 4, 7, 11] for 4 of 12.
    """
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def key_mapping(layers: list[int]) -> dict[str, str]:
    """The full student-key -> teacher-key table for a layer list."""
    mapping = dict(EMBEDDING_AND_HEAD_MAP)
    for s, t in enumerate(layers):
        for ours, theirs in LAYER_MAP.items():
            for p in ("weight", "bias"):
                mapping[f"distilbert.transformer.layer.{s}.{ours}.{p}"] = f"bert.encoder.layer.{t}.{theirs}.{p}"
    return mapping


def check_compatible(student: DistilBertConfig, teacher_shaped: DistilBertConfig) -> None:
    """Refuse a student config whose tensor shapes differ from the teacher's (one line naming each)."""
    fields = {"dim": "hidden_size", "n_heads": "num_attention_heads", "hidden_dim": "intermediate_size",
              "vocab_size": "vocab_size", "max_position_embeddings": "max_position_embeddings"}
    bad = [f"student {ours}={getattr(student, ours)} vs teacher {theirs}={getattr(teacher_shaped, ours)}"
           for ours, theirs in fields.items() if getattr(student, ours) != getattr(teacher_shaped, ours)]
    if bad:
        raise ValueError(f"cannot initialise this student from the teacher ({'; '.join(bad)}): copying layers needs "
                         "the teacher's shapes; drop the student preset, or use student.init=random")


def init_from_teacher(teacher, layers: list[int] | None = None,
                      config: DistilBertConfig | None = None) -> DistilBERTForMaskedLM:
    """A `DistilBERTForMaskedLM` with the teacher's width and the chosen teacher layers.

    `teacher`: a `transformers.BertForMaskedLM` or a `teachers.Teacher`. `layers`: teacher layer indices,
    one per student layer (default: `default_layers` for half the depth). `config`: an intended student
    config (e.g. a preset) to check against the teacher — its width, heads, FFN size, vocabulary and
    positions must be the teacher's, since the tensors are copied. Raises ValueError for layer lists out
    of range, incompatible configs and teachers DistilBERT cannot represent.
    """
    model: BertForMaskedLM = getattr(teacher, "model", teacher)
    c = model.config
    n_teacher = c.num_hidden_layers
    if layers is None:
        layers = default_layers(n_teacher, half_depth(n_teacher))
    layers = list(layers)
    if not layers or any(not 0 <= i < n_teacher for i in layers):
        raise ValueError(f"student layers {layers} must be non-empty indices in [0, {n_teacher - 1}]")
    derived = config_from_teacher(c, n_layers=len(layers))
    if config is not None:
        check_compatible(config, derived)
        if config.n_layers != len(layers):
            raise ValueError(f"student n_layers={config.n_layers} but {len(layers)} teacher layers {layers} were "
                             "chosen; give one teacher layer per student layer")
    student = DistilBERTForMaskedLM(derived)
    t_state = model.state_dict()
    decoder = model.cls.predictions.decoder.weight
    if decoder.data_ptr() != model.bert.embeddings.word_embeddings.weight.data_ptr() and not torch.equal(
        decoder, model.bert.embeddings.word_embeddings.weight
    ):
        raise ValueError("the teacher's MLM decoder is not tied to its word embeddings; DistilBERT ties them")
    new_state = {}
    for s_key, t_key in key_mapping(layers).items():
        value = t_state[t_key].detach().float().clone()
        if s_key == "distilbert.embeddings.position_embeddings.weight":
            value += t_state[TOKEN_TYPE_KEY][0].float()  # (P, C) + (C,)
        new_state[s_key] = value
    new_state["vocab_projector.weight"] = new_state["distilbert.embeddings.word_embeddings.weight"]
    student.load_state_dict(new_state, strict=True)
    student.tie_weights()
    return student
