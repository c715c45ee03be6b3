"""The flat public API for scripts and notebooks: every name of `students` (the model, its configs,
initialisation from a teacher), the tokenizer, in-memory data loaders, metrics and AMPTrainer."""

import students
from distill.amp_trainer import AMPTrainer
from distill.loaders import ClassificationDataset, MLMDataset, create_classification_dataloader, create_mlm_dataloader
from distill.metrics import (
    compute_classification_loss,
    compute_confusion_matrix,
    compute_mlm_loader_loss,
    compute_mlm_loss,
    compute_precision_recall_f1,
    evaluate_classification_metrics,
)
from students import *  # noqa: F403  (the model classes and config helpers, listed in students.__all__)
from students.tokenizer import get_tokenizer

__all__ = [
    *students.__all__,
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
    "get_tokenizer",
]
