"""`AMPTrainer`: the flat API's small mixed-precision trainer for MLM and classification models.

It is for scripts and notebooks (see examples/train_distilbert.py); the recipe-driven runs use
distill.train (distillation) and distill.downstream.finetune (fine-tuning) on Accelerate.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import torch

from distill.mechanics import DTYPES, OptimizerStep, require_finite
from distill.metrics import compute_mlm_loader_loss, evaluate_classification_metrics

PRECISIONS = ("fp16", "bf16", "fp32")


class AMPTrainer:
    """Steps a model (`DistilBERTForMaskedLM` or `...ForSequenceClassification`, or their transformers
    twins) on batches {input_ids, attention_mask, labels} under `torch.amp.autocast`.

    fp16 uses a `torch.amp.GradScaler` (loss scaling; steps with inf/NaN gradients are skipped); bf16
    needs none; fp32 disables autocast. Gradients are clipped to `max_grad_norm`.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 precision: Literal["fp16", "bf16", "fp32"] = "bf16", scheduler: Any = None,
                 max_grad_norm: float | None = 1.0, device: str | torch.device | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}; choose one of {list(PRECISIONS)}")
        self.device = torch.device(device) if device else next(model.parameters()).device
        if precision == "fp16" and self.device.type == "cpu":
            raise ValueError("fp16 autocast needs a GPU; use precision='bf16' or 'fp32' on CPU")
        self.model = model.to(self.device)
        self.optimizer, self.scheduler, self.max_grad_norm = optimizer, scheduler, max_grad_norm
        self.precision = precision
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.optimizer_step = OptimizerStep(optimizer, scheduler, max_grad_norm, scaler=self.scaler)
        self.step_count = 0

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision])

    def train_step(self, batch: dict[str, torch.Tensor]) -> float:
        """One optimizer step on one batch; returns the loss (the model's own: MLM or classification)."""
        self.model.train()
        b = {k: v.to(self.device) for k, v in batch.items()}
        with self.autocast():
            loss = self.model(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        require_finite(loss.item(), self.step_count + 1, "Try a lower learning rate, or precision='fp32'")
        self.scaler.scale(loss).backward()
        self.optimizer_step(self.model.parameters())
        self.step_count += 1
        return loss.item()

    def train_epoch(self, dataloader) -> float:
        """One pass; returns the mean loss."""
        losses = [self.train_step(b) for b in dataloader]
        return sum(losses) / max(len(losses), 1)

    def evaluate(self, dataloader) -> dict[str, Any]:
        """Classification metrics, or MLM loss/perplexity/accuracy for a masked-LM model."""
        with self.autocast():
            if hasattr(self.model, "vocab_projector") or hasattr(self.model, "cls"):
                return compute_mlm_loader_loss(self.model, dataloader)
            return evaluate_classification_metrics(self.model, dataloader)
