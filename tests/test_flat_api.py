"""The flat API (`distilbert_kit`) the README and examples use: data loaders, AMPTrainer, metrics."""

import pytest
import torch
from transformers import DistilBertConfig

import distilbert_kit
import students
from distilbert_kit import (
    AMPTrainer,
    DistilBERTForMaskedLM,
    DistilBERTForSequenceClassification,
    create_classification_dataloader,
    create_mlm_dataloader,
    evaluate_classification_metrics,
)
from tests.cli import python

TEXTS = [f"sentence number {i} is about {'cats' if i % 2 else 'dogs'} and the weather" for i in range(40)]
LABELS = [i % 2 for i in range(40)]
TINY = DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64, dropout=0.0, attention_dropout=0.0)


def test_mlm_dataloader_batches_and_fresh_masks(tokenizer):
    dl = create_mlm_dataloader(TEXTS, tokenizer, batch_size=8, mask_probability=0.3, shuffle=False)
    first = next(iter(dl))
    assert set(first) == {"input_ids", "attention_mask", "labels"}
    assert ((first["labels"] != -100) & (first["attention_mask"] == 0)).sum() == 0
    second = next(iter(dl))
    assert not torch.equal(first["labels"], second["labels"]), "masks must be redrawn every epoch"


def test_classification_dataloader(tokenizer):
    dl = create_classification_dataloader(TEXTS, LABELS, tokenizer, batch_size=8, shuffle=False)
    b = next(iter(dl))
    assert b["labels"].tolist() == LABELS[:8] and b["input_ids"][:, 0].eq(tokenizer.cls_token_id).all()
    with pytest.raises(ValueError, match="40 texts but 3 labels"):
        create_classification_dataloader(TEXTS, LABELS[:3], tokenizer, batch_size=8)


def test_amp_trainer_learns_a_separable_task(tokenizer):
    torch.manual_seed(0)
    model = DistilBERTForSequenceClassification(DistilBertConfig(**TINY.to_dict(), num_labels=2))
    dl = create_classification_dataloader(TEXTS, LABELS, tokenizer, batch_size=8)
    trainer = AMPTrainer(model, torch.optim.AdamW(model.parameters(), lr=3e-3), precision="bf16")
    losses = [trainer.train_epoch(dl) for _ in range(8)]
    assert losses[-1] < losses[0] * 0.5
    metrics = evaluate_classification_metrics(model, create_classification_dataloader(TEXTS, LABELS, tokenizer, 8))
    assert metrics["accuracy"] > 0.9 and len(metrics["confusion_matrix"]) == 2


def test_amp_trainer_mlm_and_precision_checks(tokenizer):
    model = DistilBERTForMaskedLM(TINY)
    dl = create_mlm_dataloader(TEXTS, tokenizer, batch_size=8)
    trainer = AMPTrainer(model, torch.optim.AdamW(model.parameters(), lr=1e-3), precision="fp32")
    assert trainer.train_step(next(iter(dl))) > 0
    assert {"loss", "perplexity", "accuracy"} <= set(trainer.evaluate(dl))
    with pytest.raises(ValueError, match="fp16 autocast needs a GPU"):
        AMPTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), precision="fp16")


@pytest.mark.slow
def test_example_script_runs_offline():
    proc = python("examples/train_distilbert.py", "--preset", "tiny", "--epochs", "1", "--max-train", "64",
                  "--max-length", "32", "--precision", "fp32")
    assert "test accuracy" in proc.stdout and "confusion matrix" in proc.stdout


def test_flat_api_reexports_every_name_of_students():
    assert set(students.__all__) <= set(distilbert_kit.__all__)
    assert all(getattr(distilbert_kit, name) is getattr(students, name) for name in students.__all__)
    assert distilbert_kit.init_from_teacher is students.init_from_teacher

