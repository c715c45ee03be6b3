"""The DistilBERT student: model, configs, initialisation from a teacher."""

from students.config import PRESETS, config_from_teacher, count_parameters, create_model_config, half_depth
from students.init import default_layers, init_from_teacher
from students.modeling import (
    GELU,
    DistilBERTForMaskedLM,
    DistilBERTForSequenceClassification,
    DistilBERTModel,
    FeedForward,
    LayerNorm,
    MultiHeadAttention,
    TransformerEncoderBlock,
)

__all__ = [
    "GELU",
    "PRESETS",
    "DistilBERTForMaskedLM",
    "DistilBERTForSequenceClassification",
    "DistilBERTModel",
    "FeedForward",
    "LayerNorm",
    "MultiHeadAttention",
    "TransformerEncoderBlock",
    "config_from_teacher",
    "count_parameters",
    "create_model_config",
    "half_depth",
    "default_layers",
    "init_from_teacher",
]
