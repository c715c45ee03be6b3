"""The flat public API (the names the project's README and examples use), re-exported from the packages."""

from students import (
    GELU,
    DistilBERTForMaskedLM,
    DistilBERTForSequenceClassification,
    DistilBERTModel,
    FeedForward,
    LayerNorm,
    MultiHeadAttention,
    TransformerEncoderBlock,
    config_from_teacher,
    count_parameters,
    create_model_config,
)
from students.tokenizer import get_tokenizer

__all__ = [
    "GELU",
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
    "get_tokenizer",
]
