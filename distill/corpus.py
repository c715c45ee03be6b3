"""Pretraining corpora through `datasets`: load (the offline Wikipedia summaries, hub datasets, local
files), check files before any slow work, split validation by a hash of the text, tokenize (cached on
disk under keys of everything that decides the output), pack or split documents, count token frequencies.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from distill.recipes import DataConfig
from resources import wiki_summaries_path

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1"  # bump when tokenization/packing output changes, to invalidate caches


# ---------------------------------------------------------------------------------------------- loading
def _wiki_summaries(path: str) -> Iterator[dict[str, str]]:
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    for record in records.values():
        yield {"title": record["title"], "text": record["extract"], "topic": record.get("topic") or ""}


def load_wiki_summaries() -> datasets.Dataset:
    """The offline Wikipedia summaries as a cached Dataset with columns title, text, topic."""
    path = wiki_summaries_path()
    stat = path.stat()
    return datasets.Dataset.from_generator(
        _wiki_summaries,
        gen_kwargs={"path": str(path)},
        # Keyed by the file's identity, so a reinstalled corpus is re-read.
        fingerprint=_hash("wiki-summaries", str(path), stat.st_size, stat.st_mtime_ns),
    )


def file_format(files: list[str]) -> str:
    suffixes = {Path(f).suffix.lower() for f in files}
    formats = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    unknown = suffixes - set(formats)
    if unknown:
        raise ValueError(f"data files with suffix {sorted(unknown)} are not supported; use .txt, .jsonl, .parquet")
    kinds = {formats[s] for s in suffixes}
    if len(kinds) != 1:
        raise ValueError(f"data files mix formats {sorted(kinds)}; use one format per corpus")
    return kinds.pop()


class DataError(ValueError):
    """A corpus that cannot be used as given (reported as one line)."""


TEXT_CHECK_BYTES = 8 << 20  # files up to this size are checked whole before any work; larger: their first 8 MiB


def check_files(cfg: DataConfig) -> None:
    """Before any slow work: every data file exists, has a supported format, is not empty, and (text
    formats) is UTF-8 with some non-blank text."""
    if cfg.source != "files":
        return
    for f in cfg.files:
        path = Path(f)
        if not path.exists():
            raise FileNotFoundError(f"data file {f} not found (data.files)")
        if not path.is_file():
            raise DataError(f"data file {f} is not a file (data.files)")
    fmt = file_format(cfg.files)
    for f in cfg.files:
        path = Path(f)
        if path.stat().st_size == 0:
            raise DataError(f"data file {f} is empty (data.files)")
        if fmt == "parquet":
            continue
        with path.open("rb") as fh:
            head = fh.read(TEXT_CHECK_BYTES)
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError as e:
            if not (e.reason == "unexpected end of data" and len(head) == TEXT_CHECK_BYTES):
                raise DataError(f"data file {f} is not UTF-8 text (byte {e.start}); convert it, e.g. iconv -t "
                                "utf-8") from None
            text = head[:e.start].decode("utf-8")
        if not text.strip():
            raise DataError(f"data file {f} has no text (only blank lines)")
        if path.suffix.lower() == ".jsonl":
            complete = len(head) < TEXT_CHECK_BYTES
            lines = text.splitlines() if complete else text.splitlines()[:-1]
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise DataError(f"data file {f} line {n} is not JSON ({str(e).split(':')[0]}); a .jsonl file "
                                    "holds one JSON object per line") from None
                if not isinstance(record, dict):
                    raise DataError(f"data file {f} line {n} is not a JSON object")
                if cfg.text_field not in record:
                    raise DataError(f"data file {f} line {n} has no field {cfg.text_field!r} (data.text_field); "
                                    f"fields: {sorted(record)[:8]}")


def load_documents(cfg: DataConfig, streaming: bool | None = None) -> datasets.Dataset | datasets.IterableDataset:
    """The raw documents of a corpus, with at least a `text` column."""
    streaming = cfg.streaming if streaming is None else streaming
    if cfg.source == "wiki-summaries":
        ds = load_wiki_summaries()
        if streaming:
            ds = ds.to_iterable_dataset()
    elif cfg.source == "files":
        missing = [f for f in cfg.files if not Path(f).exists()]
        if missing:
            raise FileNotFoundError(f"data file {missing[0]} not found (data.files)")
        fmt = file_format(cfg.files)
        try:
            ds = datasets.load_dataset(fmt, data_files=list(cfg.files), split="train", streaming=streaming)
        except (datasets.exceptions.DatasetGenerationError, ValueError, OSError) as e:
            cause = e.__cause__ or e.__context__ or e
            raise DataError(f"data file {cfg.files[0] if len(cfg.files) == 1 else cfg.files} could not be read "
                            f"as {fmt}: {str(cause).splitlines()[0] if str(cause) else type(cause).__name__}") from None
    else:
        ds = datasets.load_dataset(cfg.name, cfg.config, split=cfg.split, streaming=streaming)
    columns = ds.column_names if ds.column_names is not None else list(next(iter(ds)).keys())
    if cfg.text_field not in columns:
        raise ValueError(f"corpus has no column {cfg.text_field!r} (data.text_field); columns: {columns}")
    if cfg.text_field != "text":
        if "text" in columns:
            ds = ds.remove_columns("text")
        ds = ds.rename_column(cfg.text_field, "text")
    if cfg.max_documents is not None:
        ds = ds.take(cfg.max_documents) if streaming else ds.select(range(min(cfg.max_documents, len(ds))))
    return ds


def stable_hash(key: str, digest: str = "blake2b") -> int:
    """An integer hash of `key`, the same on every machine and in every process (Python's `hash` is salted):
    64-bit blake2b (validation splits, masking seeds), or the 128-bit md5 that the topic task's split has
    always used (kept, so its test articles never move)."""
    data = key.encode("utf-8")
    if digest == "md5":
        return int.from_bytes(hashlib.md5(data).digest(), "big")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def in_validation(text: str, fraction: float) -> bool:
    """Deterministic, order-independent split: a document is held out by the hash of its text."""
    return stable_hash(text) % 1_000_000 < fraction * 1_000_000


# ---------------------------------------------------------------------------------------------- tokenizing
def tokenize_and_chunk(batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, max_length: int,
                       packing: bool) -> dict[str, list]:
    """Tokenize documents and cut them into sequences of at most max_length tokens, [CLS] ... [SEP].

    packing=False: each document is split into consecutive pieces (never dropped; the last may be short).
    packing=True: documents are concatenated with [SEP] between them and cut into full blocks; the
    remainder of each map batch is kept as one shorter block.
    """
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    body = max_length - 2
    docs = tokenizer([t for t in batch["text"]], add_special_tokens=False)["input_ids"]
    out: list[list[int]] = []
    if packing:
        stream: list[int] = []
        for ids in docs:
            if ids:
                stream.extend(ids)
                stream.append(sep)
        for i in range(0, len(stream), body):
            piece = stream[i : i + body]
            if piece[-1] == sep:  # no doubled [SEP] at a block boundary
                piece = piece[:-1]
            if piece:
                out.append([cls, *piece, sep])
    else:
        for ids in docs:
            for i in range(0, len(ids), body):
                out.append([cls, *ids[i : i + body], sep])
    return {"input_ids": out, "length": [len(x) for x in out]}


@dataclass
class Corpus:
    """Tokenized train/validation sequences and their statistics."""

    train: datasets.Dataset | datasets.IterableDataset
    validation: datasets.Dataset
    stats: dict[str, Any]


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Stable identity of a tokenizer's vocabulary and normalisation (datasets' own hashing of a tokenizer
    object is not stable across calls, so the map cache key is built from this instead)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    # Truncation and padding are per-call state that transformers sets and resets; the rest is identity.
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return _hash(type(tokenizer).__name__, json.dumps(spec, sort_keys=True))


def corpus_identity(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The settings that decide a corpus's sequences (for cache keys of things trained on it)."""
    fields = ("source", "name", "config", "split", "files", "text_field", "packing", "max_length",
              "validation_fraction", "max_validation_documents", "max_documents")
    return {**{f: getattr(cfg, f) for f in fields}, "tokenizer": tokenizer_fingerprint(tokenizer)}


def build_corpus(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> Corpus:
    """Load, split (validation by text hash), tokenize with `Dataset.map(batched=True, num_proc=...)`
    (cached on disk: a second run reuses the cache files), and report what was kept."""
    tok_id = tokenizer_fingerprint(tokenizer)
    fn_kwargs = dict(tokenizer=tokenizer, max_length=cfg.max_length, packing=cfg.packing)
    frac = cfg.validation_fraction
    if cfg.streaming:
        docs = load_documents(cfg, streaming=True)
        train_docs = docs.filter(lambda ex: not in_validation(ex["text"], frac))
        # Validation comes from the first documents of the stream that hash into it, materialised.
        val_docs = datasets.Dataset.from_list(
            list(docs.filter(lambda ex: in_validation(ex["text"], frac)).take(cfg.max_validation_documents))
        )
        remove = train_docs.column_names or list(next(iter(docs)).keys())
        train = train_docs.map(tokenize_and_chunk, batched=True, fn_kwargs=fn_kwargs, remove_columns=remove)
        validation = val_docs.map(tokenize_and_chunk, batched=True, fn_kwargs=fn_kwargs,
                                  remove_columns=val_docs.column_names)
        if len(validation) == 0:
            raise DataError("the streamed corpus has no validation text among its first documents; raise "
                            "data.validation_fraction or data.max_validation_documents")
        stats = {"streaming": True, "validation_sequences": len(validation)}
        return Corpus(train=train, validation=validation, stats=stats)

    docs = load_documents(cfg, streaming=False)
    key = _hash(FORMAT_VERSION, docs._fingerprint, tok_id, cfg.max_length, cfg.packing, frac)
    is_val = docs.map(lambda ex: {"_val": in_validation(ex["text"], frac)}, num_proc=None,
                      new_fingerprint=_hash("split", docs._fingerprint, frac), desc="hash split")
    parts = {}
    for name, want in (("train", False), ("validation", True)):
        part = is_val.filter(lambda ex, w=want: ex["_val"] == w, new_fingerprint=_hash("filter", key, name))
        if name == "validation" and len(part) > cfg.max_validation_documents:
            part = part.select(range(cfg.max_validation_documents))
        n_docs = len(part)
        part = part.map(
            tokenize_and_chunk,
            batched=True,
            fn_kwargs=fn_kwargs,
            remove_columns=part.column_names,
            num_proc=cfg.num_proc if len(part) > 4 * 1000 else None,
            new_fingerprint=_hash("tokenize", key, name, len(part)),
            desc=f"tokenize {name}",
        )
        parts[name] = (part, n_docs)
    train, n_train_docs = parts["train"]
    validation, n_val_docs = parts["validation"]
    if len(train) == 0:
        raise DataError(f"the corpus has no training text ({len(docs)} documents, {n_train_docs} outside the "
                        "validation split, all empty); give it non-empty documents")
    if len(validation) == 0:
        raise DataError(f"the corpus has no validation text ({n_val_docs} of {len(docs)} documents held out); "
                        "raise data.validation_fraction or add documents")
    lengths = np.asarray(train["length"])
    stats = {
        "documents": len(docs),
        "train_documents": n_train_docs,
        "validation_documents": n_val_docs,
        "train_sequences": len(train),
        "validation_sequences": len(validation),
        "train_tokens": int(lengths.sum()),
        "mean_sequence_length": float(lengths.mean()) if len(lengths) else 0.0,
        "packing": cfg.packing,
        "max_length": cfg.max_length,
    }
    logger.info("corpus: %s", stats)
    return Corpus(train=train, validation=validation, stats=stats)


def token_frequencies(ds: datasets.Dataset | datasets.IterableDataset, vocab_size: int, max_tokens: int) -> np.ndarray:
    """Token frequencies over (up to max_tokens of) a tokenized corpus, for masking smoothing."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    seen = 0
    rows = ds.iter(batch_size=1000) if isinstance(ds, datasets.Dataset) else _batched(ds, 1000)
    for batch in rows:
        flat = np.fromiter((t for ids in batch["input_ids"] for t in ids), dtype=np.int64)
        counts += np.bincount(flat, minlength=vocab_size)[:vocab_size]
        seen += flat.size
        if seen >= max_tokens:
            break
    return counts


def _batched(ds: datasets.IterableDataset, n: int) -> Iterator[dict[str, list]]:
    buf: list[dict] = []
    for ex in ds:
        buf.append(ex)
        if len(buf) == n:
            yield {"input_ids": [b["input_ids"] for b in buf]}
            buf = []
    if buf:
        yield {"input_ids": [b["input_ids"] for b in buf]}


