"""In-memory datasets and loaders for scripts and notebooks (the flat API of `distilbert_kit`): lists of
texts for masked-LM training, and texts with labels for sequence classification. The recipe-driven jobs
read corpora through distill.corpus and distill.batching instead.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from distill.batching import example_seed
from distill.corpus import tokenize_and_chunk
from distill.masking import MLMCollator
from distill.recipes import MaskingConfig


# ---------------------------------------------------------------------------------------------- masked LM
class MLMDataset(torch.utils.data.Dataset):
    """In-memory texts for MLM: each text tokenized ([CLS] ... [SEP]) and split into pieces of at most
    max_length tokens (never dropped). Items are {"input_ids", "seed"}; `MLMCollator` masks them."""

    def __init__(self, texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int = 128, seed: int = 0):
        self.sequences = tokenize_and_chunk({"text": list(texts)}, tokenizer, max_length, packing=False)["input_ids"]
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Masks are redrawn per epoch (the loaders below call this for you)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.sequences[i], "seed": example_seed(self.seed, self.epoch, i)}


class _EpochLoader(torch.utils.data.DataLoader):
    """A DataLoader that advances its dataset's epoch (fresh masks) at every pass."""

    def __iter__(self):
        it = super().__iter__()
        self.dataset.set_epoch(self.dataset.epoch + 1)
        return it


def create_mlm_dataloader(texts: list[str], tokenizer: PreTrainedTokenizerBase, batch_size: int,
                          mask_probability: float = 0.15, max_length: int = 128, shuffle: bool = True,
                          seed: int = 0) -> torch.utils.data.DataLoader:
    """Batches {input_ids, attention_mask, labels (-100 where no prediction)} with dynamic masking."""
    dataset = MLMDataset(texts, tokenizer, max_length, seed)
    collator = MLMCollator(tokenizer, MaskingConfig(probability=mask_probability, smoothing=0.0))
    return _EpochLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collator,
                        generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- classification
class ClassificationDataset(torch.utils.data.Dataset):
    """Texts (and optional second texts) with integer labels, tokenized up front (truncated to
    max_length: a classifier reads the start of a document)."""

    def __init__(self, texts: list[str], labels: list[int], tokenizer: PreTrainedTokenizerBase,
                 max_length: int = 128, text_pairs: list[str] | None = None):
        if len(texts) != len(labels) or (text_pairs is not None and len(text_pairs) != len(texts)):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels" +
                             (f" and {len(text_pairs)} text pairs" if text_pairs is not None else ""))
        enc = tokenizer(list(texts), list(text_pairs) if text_pairs is not None else None, truncation=True,
                        max_length=max_length)
        self.input_ids = enc["input_ids"]
        self.labels = [int(x) for x in labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.input_ids[i], "label": self.labels[i]}


class PadCollator:
    """Pads to the longest sequence: {input_ids, attention_mask, labels}."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        T = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(examples):
            ids[i, : len(e["input_ids"])] = torch.as_tensor(e["input_ids"])
            mask[i, : len(e["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.tensor([e["label"] for e in examples], dtype=torch.long)}


def create_classification_dataloader(texts: list[str], labels: list[int], tokenizer: PreTrainedTokenizerBase,
                                     batch_size: int, max_length: int = 128, shuffle: bool = True,
                                     text_pairs: list[str] | None = None, seed: int = 0) -> torch.utils.data.DataLoader:
    """Batches {input_ids, attention_mask, labels} for sequence classification."""
    dataset = ClassificationDataset(texts, labels, tokenizer, max_length, text_pairs)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                                       collate_fn=PadCollator(tokenizer.pad_token_id),
                                       generator=torch.Generator().manual_seed(seed))
