"""Sequence-classification data: the offline Wikipedia topic task, hub tasks (SST-2, IMDb, MRPC, MNLI),
and local files. Every source yields train/validation/test splits with
columns `text`, optional `text_pair`, and an integer `label`."""

from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from distill.corpus import file_format, load_wiki_summaries, stable_hash
from distill.loaders import create_classification_dataloader
from distill.recipes import TaskConfig

# Hub presets: (dataset, config, text, text_pair, {our split: hub split}). GLUE test labels are hidden,
# so the official validation split is our test split and validation is carved from train.
PRESETS: dict[str, tuple[str, str | None, str, str | None, dict[str, str]]] = {
    "sst2": ("glue", "sst2", "sentence", None, {"train": "train", "test": "validation"}),
    "imdb": ("imdb", None, "text", None, {"train": "train", "test": "test"}),
    "mrpc": ("glue", "mrpc", "sentence1", "sentence2", {"train": "train", "test": "validation"}),
    "mnli": ("glue", "mnli", "premise", "hypothesis",
             {"train": "train", "validation": "validation_matched", "test": "validation_mismatched"}),
}
WIKI_DROPPED_TOPIC = "Uncategorized"


def _bucket(key: str) -> int:
    """0..99 from a stable hash: the split a record falls in never depends on order or machine."""
    return stable_hash(key, "md5") % 100


@dataclass
class ClassificationData:
    splits: datasets.DatasetDict
    label_names: list[str]
    stats: dict[str, Any]


def wiki_topics() -> ClassificationData:
    """Topic classification on the offline Wikipedia summaries: `Uncategorized` dropped; split 80/10/10
    by a hash of the title (deterministic, disjoint)."""
    ds = load_wiki_summaries().filter(lambda ex: ex["topic"] not in ("", WIKI_DROPPED_TOPIC))
    names = sorted(set(ds["topic"]))
    index = {n: i for i, n in enumerate(names)}
    ds = ds.map(lambda ex: {"label": index[ex["topic"]], "_b": _bucket(ex["title"])})
    splits = datasets.DatasetDict({
        "train": ds.filter(lambda ex: ex["_b"] < 80),
        "validation": ds.filter(lambda ex: 80 <= ex["_b"] < 90),
        "test": ds.filter(lambda ex: ex["_b"] >= 90),
    }).select_columns(["text", "label"])
    return ClassificationData(splits, names, _stats(splits, names))


def _stats(splits: datasets.DatasetDict, names: list[str]) -> dict[str, Any]:
    return {name: {"examples": len(split),
                   "class_counts": {names[k]: v for k, v in sorted(collections.Counter(split["label"]).items())}}
            for name, split in splits.items()}


def _carve_validation(train: datasets.Dataset, text_field: str) -> tuple[datasets.Dataset, datasets.Dataset]:
    bucket = train.map(lambda ex: {"_b": _bucket(str(ex[text_field]))})
    return bucket.filter(lambda ex: ex["_b"] >= 5), bucket.filter(lambda ex: ex["_b"] < 5)


def load_classification(cfg: TaskConfig, seed: int = 0) -> ClassificationData:
    """train/validation/test with columns text, [text_pair], label, and the label names. With
    `max_train_examples`, train is a seeded stratified subset (every class in its share, at least one)."""
    data = _load_classification(cfg)
    if cfg.max_train_examples is not None and len(data.splits["train"]) > cfg.max_train_examples:
        keep = stratified_indices(data.splits["train"]["label"], cfg.max_train_examples, seed)
        data.splits["train"] = data.splits["train"].select(keep)
        data.stats = _stats(data.splits, data.label_names)
    return data


def stratified_indices(labels: list[int], n: int, seed: int) -> list[int]:
    """`n` indices drawn per class in proportion to its frequency (largest remainders; every class gets at
    least one while n allows), shuffled within the class by `seed`; returned in their original order."""
    by_class: dict[int, list[int]] = collections.defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    classes = sorted(by_class)
    total = len(labels)
    exact = {c: n * len(by_class[c]) / total for c in classes}
    take = {c: int(exact[c]) for c in classes}
    if n >= len(classes):
        for c in classes:
            take[c] = max(take[c], 1)
    spare = n - sum(take.values())
    for c in sorted(classes, key=lambda c: (take[c] - exact[c], c)):  # largest remainders first
        if spare <= 0:
            break
        if take[c] < len(by_class[c]):
            take[c] += 1
            spare -= 1
    while sum(take.values()) > n:  # the minimum of one per class overshot: trim the largest classes
        c = max(classes, key=lambda c: (take[c], -c))
        take[c] -= 1
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for c in classes:
        members = by_class[c]
        order = torch.randperm(len(members), generator=gen).tolist()
        chosen += [members[j] for j in order[: take[c]]]
    return sorted(chosen)


def _load_classification(cfg: TaskConfig) -> ClassificationData:
    if cfg.source == "wiki-topics":
        return wiki_topics()
    text, pair, label = cfg.text_field, cfg.text_pair_field, cfg.label_field
    if cfg.source == "files":
        for path in cfg.splits.values():
            if not Path(path).exists():
                raise FileNotFoundError(f"task file {path} not found (task.splits)")
        raw = datasets.load_dataset(file_format(list(cfg.splits.values())), data_files=dict(cfg.splits))
    else:
        if cfg.source == "hub":
            name, config, mapping = cfg.name, cfg.config, dict(cfg.splits or {"train": "train", "test": "test"})
        else:
            name, config, text, pair, mapping = PRESETS[cfg.source]
        raw = datasets.DatasetDict({ours: datasets.load_dataset(name, config, split=theirs)
                                    for ours, theirs in mapping.items()})
    for col in [text, label] + ([pair] if pair else []):
        if col not in raw["train"].column_names:
            raise ValueError(f"task data has no column {col!r}; columns: {raw['train'].column_names}")
    if "validation" not in raw:
        raw["train"], raw["validation"] = _carve_validation(raw["train"], text)
    label_feature = raw["train"].features[label]
    if isinstance(label_feature, datasets.ClassLabel):
        names = list(label_feature.names)
        to_index = None
    else:
        names = sorted({str(v) for v in raw["train"][label]})
        to_index = {n: i for i, n in enumerate(names)}

    def convert(ex):
        out = {"text": ex[text], "label": ex[label] if to_index is None else to_index[str(ex[label])]}
        if pair:
            out["text_pair"] = ex[pair]
        return out

    keep = ["text", "label"] + (["text_pair"] if pair else [])
    splits = datasets.DatasetDict({k: v.map(convert).select_columns(keep) for k, v in raw.items()})
    return ClassificationData(splits, names, _stats(splits, names))


def split_loader(split: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, batch_size: int, max_length: int,
                 shuffle: bool, seed: int = 0) -> torch.utils.data.DataLoader:
    """A loader over one split of `load_classification`."""
    pairs = split["text_pair"] if "text_pair" in split.column_names else None
    return create_classification_dataloader(split["text"], split["label"], tokenizer, batch_size, max_length,
                                            shuffle, pairs, seed)
