"""The flat public API (the names the project's README and examples use), re-exported from the packages."""

from distill.amp_trainer import AMPTrainer
from distill.data import MLMDataset, create_mlm_dataloader
from distill.metrics import (
    compute_classification_loss,
    compute_confusion_matrix,
    compute_mlm_loader_loss,
    compute_mlm_loss,
    compute_precision_recall_f1,
    evaluate_classification_metrics,
)
from distill.tasks import ClassificationDataset, create_classification_dataloader
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
    "AMPTrainer",
    "ClassificationDataset",
    "MLMDataset",
    "compute_classification_loss",
    "compute_confusion_matrix",
    "compute_mlm_loader_loss",
    "compute_mlm_loss",
    "compute_precision_recall_f1",
    "create_classification_dataloader",
    "create_mlm_dataloader",
    "evaluate_classification_metrics",
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
