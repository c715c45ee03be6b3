"""Evaluation metrics: classification (checked against scikit-learn in the tests) and the one masked-LM
evaluator that distillation, teacher adaptation, the report and the flat API share."""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F


def _as_tensor(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.long).flatten()


def compute_confusion_matrix(labels, predictions, num_classes: int | None = None) -> torch.Tensor:
    """(K, K) counts; row = true class, column = predicted class."""
    y, p = _as_tensor(labels), _as_tensor(predictions)
    if y.shape != p.shape:
        raise ValueError(f"{y.numel()} labels but {p.numel()} predictions")
    if num_classes is not None:
        k = num_classes
    else:
        k = int(max(y.max(), p.max()).item()) + 1 if y.numel() else 0
    return torch.bincount(y * k + p, minlength=k * k).reshape(k, k)


def compute_precision_recall_f1(labels, predictions, num_classes: int | None = None) -> dict[str, Any]:
    """Per-class precision/recall/F1/support and their macro, micro and support-weighted averages.
    A class never predicted (or never present) has precision (recall) 0, as scikit-learn's zero_division=0."""
    cm = compute_confusion_matrix(labels, predictions, num_classes).double()
    tp = cm.diag()
    predicted, support = cm.sum(0), cm.sum(1)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    total = support.sum().clamp(min=1)
    micro = (tp.sum() / total).item()  # single-label: micro P = micro R = micro F1 = accuracy
    weights = support / total
    return {
        "per_class": {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
                      "support": support.long().tolist()},
        "macro": {"precision": precision.mean().item(), "recall": recall.mean().item(), "f1": f1.mean().item()},
        "micro": {"precision": micro, "recall": micro, "f1": micro},
        "weighted": {"precision": (precision * weights).sum().item(), "recall": (recall * weights).sum().item(),
                     "f1": (f1 * weights).sum().item()},
    }


def compute_classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the batch (regression MSE when there is one output)."""
    if logits.size(-1) == 1:
        return F.mse_loss(logits.squeeze(-1), labels.float())
    return F.cross_entropy(logits.float(), labels)


def compute_mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions whose label is not -100. logits (B, T, V), labels (B, T)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100)


class MaskedLM(Protocol):
    """What the masked-LM evaluator needs: the encoder's last hidden state, and the MLM head applied to
    any rows of it (so only the masked positions are projected onto the vocabulary). Implemented by the
    student (`students.DistilBERTForMaskedLM`) and the teacher (`teachers.Teacher`)."""

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...

    def predict_tokens(self, hidden: torch.Tensor) -> torch.Tensor: ...


def masked_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  rows: torch.Tensor) -> torch.Tensor:
    """Logits (N, V) at the positions `rows` (B, T) selects: through the `MaskedLM` protocol, a transformers
    `BertForMaskedLM` (a teacher being adapted), or, for any other masked LM, its full logits."""
    if hasattr(model, "encode") and hasattr(model, "predict_tokens"):
        return model.predict_tokens(model.encode(input_ids, attention_mask)[rows])
    if hasattr(model, "bert") and hasattr(model, "cls"):
        return model.cls(model.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[rows])
    return model(input_ids, attention_mask=attention_mask).logits[rows]


@dataclass
class MaskedLMScores:
    """One masked-LM evaluation token by token: which scored tokens the model predicted right (in batch
    order), the summed cross-entropy, and a fingerprint of what was scored (every batch's inputs, attention
    mask and labels), so two evaluations are paired token by token only when they scored the same tokens."""

    correct: torch.Tensor  # (N,) bool
    loss_sum: float
    fingerprint: str

    def metrics(self) -> dict[str, float]:
        n = self.correct.numel()
        return {"mlm_loss": self.loss_sum / max(n, 1), "mlm_accuracy": int(self.correct.sum()) / max(n, 1),
                "tokens": int(n)}


def fingerprint_batch(digest, batch: dict[str, torch.Tensor]) -> None:
    for key in ("input_ids", "attention_mask", "labels"):
        digest.update(key.encode())
        digest.update(batch[key].detach().to("cpu", torch.int64).contiguous().numpy().tobytes())


@torch.no_grad()
def masked_lm_scores(model: Any, batches: Iterable[dict[str, torch.Tensor]], device: torch.device) -> MaskedLMScores:
    """Per-token correctness and summed cross-entropy of a masked LM over collated batches {input_ids,
    attention_mask, labels (-100: not scored)}, in eval mode (a module's training mode is restored after)."""
    was_training = getattr(model, "training", False)
    if isinstance(model, torch.nn.Module):
        model.eval()
    digest = hashlib.sha256()
    loss, correct = 0.0, []
    for batch in batches:
        fingerprint_batch(digest, batch)
        b = {k: v.to(device) for k, v in batch.items()}
        rows = b["labels"] != -100
        logits = masked_logits(model, b["input_ids"], b["attention_mask"], rows).float()  # (N, V)
        target = b["labels"][rows]
        loss += F.cross_entropy(logits, target, reduction="sum").item()
        correct.append((logits.argmax(-1) == target).cpu())
    if isinstance(model, torch.nn.Module):
        model.train(was_training)
    return MaskedLMScores(torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool), loss,
                          digest.hexdigest())


def masked_lm_metrics(model: Any, batches: Iterable[dict[str, torch.Tensor]], device: torch.device) -> dict[str, float]:
    """Masked-token cross-entropy (summed over tokens, then divided by their number) and top-1 accuracy of
    a masked LM over collated batches (`masked_lm_scores`)."""
    return masked_lm_scores(model, batches, device).metrics()


_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int32)


def pack_correct(correct: torch.Tensor) -> str:
    """Per-token correctness (bool) as base64 of its bits (8 tokens a byte): JSON-safe, ~15 KB per 88K tokens."""
    bits = torch.zeros(-(-correct.numel() // 8) * 8, dtype=torch.uint8)
    bits[:correct.numel()] = correct.flatten().to(torch.uint8)
    packed = (bits.view(-1, 8) * _BIT_WEIGHTS).sum(1).to(torch.uint8)  # first token = high bit, as np.packbits
    return base64.b64encode(packed.numpy().tobytes()).decode("ascii")


def unpack_correct(text: str, n: int) -> torch.Tensor:
    """The inverse of `pack_correct` for n tokens."""
    packed = torch.tensor(list(base64.b64decode(text)), dtype=torch.uint8)
    bits = (packed.unsqueeze(1) & _BIT_WEIGHTS.to(torch.uint8)).ne(0).flatten()
    if bits.numel() < n or bits.numel() - n >= 8:
        raise ValueError(f"packed correctness holds {bits.numel()} bits, not {n} tokens")
    return bits[:n].clone()


def evaluate_mlm(model: Any, batches: list[list[dict]], collator: Callable, device: torch.device) -> dict[str, float]:
    """`masked_lm_metrics` over fixed held-out batches of examples, masked by `collator` (their seeds fix
    the masks, so every evaluation scores the same tokens)."""
    return score_mlm(model, batches, collator, device).metrics()


def score_mlm(model: Any, batches: list[list[dict]], collator: Callable, device: torch.device) -> MaskedLMScores:
    """`masked_lm_scores` over fixed held-out batches of examples, masked by `collator`."""
    return masked_lm_scores(model, (collator(examples) for examples in batches), device)


def compute_mlm_loader_loss(model: torch.nn.Module, dataloader) -> dict[str, float]:
    """Token-weighted masked-LM loss, perplexity and top-1 accuracy of an MLM model over a loader."""
    m = masked_lm_metrics(model, dataloader, _device(model))
    return {"loss": m["mlm_loss"], "perplexity": math.exp(m["mlm_loss"]), "accuracy": m["mlm_accuracy"],
            "tokens": m["tokens"]}


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict(model: torch.nn.Module, dataloader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labels, predictions, logits) of a sequence classifier over a loader."""
    was_training = model.training
    model.eval()
    device = _device(model)
    ys, logits = [], []
    for batch in dataloader:
        out = model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        logits.append(out.logits.float().cpu())
        ys.append(batch["labels"])
    model.train(was_training)
    logits_t = torch.cat(logits)
    return torch.cat(ys), logits_t.argmax(-1), logits_t


def evaluate_classification_metrics(model: torch.nn.Module, dataloader, num_classes: int | None = None) -> dict:
    """Accuracy, loss, precision/recall/F1 (macro, micro, weighted, per class) and the confusion matrix."""
    labels, preds, logits = predict(model, dataloader)
    k = num_classes or logits.size(-1)
    prf = compute_precision_recall_f1(labels, preds, k)
    return {"accuracy": (labels == preds).double().mean().item(),
            "loss": compute_classification_loss(logits, labels).item(), "macro_f1": prf["macro"]["f1"], **prf,
            "confusion_matrix": compute_confusion_matrix(labels, preds, k).tolist(),
            "correct": (labels == preds).int().tolist()}  # per example, in order: bootstrap intervals
