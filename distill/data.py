"""Pretraining corpora through `datasets`: load, split, tokenize (cached), pack or split documents,
and feed global batches to every process.

Each process sees the same sequence of *global* batches (a seeded sampler) and takes its own slice, so a
run's data, masks and losses do not depend on the number of processes, and resuming is an O(1) jump to
batch k rather than a replay.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from distill.recipes import DataConfig
from students.offline import wiki_summaries_path

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


def in_validation(text: str, fraction: float) -> bool:
    """Deterministic, order-independent split: a document is held out by the hash of its text."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")
    return h % 1_000_000 < fraction * 1_000_000


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


def token_counts(ds: datasets.Dataset | datasets.IterableDataset, vocab_size: int, max_tokens: int) -> np.ndarray:
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


# ---------------------------------------------------------------------------------------------- batching
class GlobalBatchSampler:
    """Seeded global batches of dataset indices, with an (epoch, batch) position for exact resume.

    group_by_length=True sorts each window of 50 batches by length and shuffles the batches (the
    reference groups by length to cut padding); with packing all lengths are equal and it is a no-op.
    Yields lists of (epoch, index) keys, one global batch at a time, forever (epochs roll over).
    """

    def __init__(self, lengths: list[int] | np.ndarray, batch_size: int, seed: int, group_by_length: bool,
                 drop_last: bool = True):
        self.lengths = np.asarray(lengths)
        if len(self.lengths) < batch_size:
            raise ValueError(f"the corpus has {len(self.lengths)} sequences, fewer than train.batch_size={batch_size}")
        self.batch_size, self.seed, self.group = batch_size, seed, group_by_length
        self.drop_last = drop_last

    def batches_per_epoch(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        if self.group:
            window = self.batch_size * 50
            order = np.concatenate([
                chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                for chunk in np.array_split(order, max(1, math.ceil(len(order) / window)))
            ])
        batches = [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        if self.drop_last and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.group:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def iterate(self, start: int = 0) -> Iterator[list[tuple[int, int]]]:
        """Global batches from global batch number `start` on (0 = the very first)."""
        per_epoch = self.batches_per_epoch()
        epoch, offset = divmod(start, per_epoch)
        while True:
            for batch in self.epoch_batches(epoch)[offset:]:
                yield [(epoch, i) for i in batch]
            epoch, offset = epoch + 1, 0


def rank_slice(batch: list, rank: int, world: int) -> list:
    """This process's contiguous share of a global batch (the global batch must divide evenly)."""
    if len(batch) % world:
        raise ValueError(f"global batch of {len(batch)} does not split over {world} processes; "
                         "make train.batch_size a multiple of the number of processes")
    n = len(batch) // world
    return batch[rank * n : (rank + 1) * n]


class KeyedDataset(torch.utils.data.Dataset):
    """Map-style view whose keys are (epoch, index): each example carries its own masking seed."""

    def __init__(self, ds: datasets.Dataset, seed: int):
        self.ds, self.seed = ds, seed

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        return {"input_ids": self.ds[index]["input_ids"], "seed": example_seed(self.seed, epoch, index)}


def example_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed per (run seed, epoch, example): masks are redrawn each epoch and do not depend on
    which process, worker or batch position handles the example."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


class _SliceSampler:
    def __init__(self, batches: Iterator[list], rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self) -> Iterator[list]:
        for batch in self.batches:
            yield rank_slice(batch, self.rank, self.world)


def train_loader(ds: datasets.Dataset, sampler: GlobalBatchSampler, collate_fn, rank: int, world: int,
                 start_batch: int = 0, num_workers: int = 0, seed: int = 0,
                 pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """An endless loader of this process's slices of the global batches, starting at `start_batch`.
    pin_memory: page-locked batches, so copies to a GPU run asynchronously (the trainer sets it on CUDA)."""
    return torch.utils.data.DataLoader(
        KeyedDataset(ds, seed),
        batch_sampler=_SliceSampler(sampler.iterate(start_batch), rank, world),
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
        # Its own generator: creating the iterator must not draw from the global RNG, which holds the
        # dropout stream that a resumed run restores from its checkpoint.
        generator=torch.Generator().manual_seed(seed),
    )


class StreamingBatches:
    """Global batches from an IterableDataset (corpora larger than RAM): shuffled through a seeded
    buffer, re-shuffled each epoch, sliced per process. Resume skips `start` batches of the stream."""

    def __init__(self, ds: datasets.IterableDataset, batch_size: int, seed: int, buffer_size: int):
        self.ds, self.batch_size, self.seed, self.buffer_size = ds, batch_size, seed, buffer_size

    def iterate(self, start: int = 0) -> Iterator[list[dict[str, Any]]]:
        produced, epoch = 0, 0
        while True:
            stream = self.ds.shuffle(seed=self.seed, buffer_size=self.buffer_size)
            stream.set_epoch(epoch)
            batch: list[dict[str, Any]] = []
            n_in_epoch = 0
            for index, ex in enumerate(stream):
                batch.append({"input_ids": ex["input_ids"], "seed": example_seed(self.seed, epoch, index)})
                if len(batch) == self.batch_size:
                    n_in_epoch += 1
                    if produced >= start:
                        yield batch
                    produced += 1
                    batch = []
            if n_in_epoch == 0:
                raise ValueError(f"the streamed corpus has fewer sequences than train.batch_size={self.batch_size}")
            epoch += 1


def streaming_loader(batches: StreamingBatches, collate_fn, rank: int, world: int,
                     start_batch: int = 0, prefetch: int = 0,
                     pin_memory: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """This process's collated slices of the streamed global batches. prefetch > 0: produced by a background
    thread (tokenization, shuffling and collation off the training loop's thread), up to `prefetch` ahead,
    in the same order."""
    def produce() -> Iterator[dict[str, torch.Tensor]]:
        for batch in batches.iterate(start_batch):
            out = collate_fn(rank_slice(batch, rank, world))
            yield {k: v.pin_memory() for k, v in out.items()} if pin_memory else out

    return Background(produce(), prefetch) if prefetch > 0 else produce()


class Background(Iterator):
    """Runs an iterator in a daemon thread, up to `depth` items ahead; items keep their order and an
    exception in the producer is raised in the consumer at the item where it happened. The fast tokenizers
    release the GIL while they encode, so the stream's tokenization overlaps the training loop."""

    _END = object()

    def __init__(self, source: Iterator, depth: int):
        import queue
        import threading

        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source,), daemon=True, name="data-prefetch")
        self._thread.start()

    def _put(self, entry) -> bool:
        import queue

        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, source: Iterator) -> None:
        try:
            for item in source:
                if not self._put((item, None)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put((None, e))
            return
        self._put((self._END, None))

    def close(self, timeout: float = 10.0) -> None:
        """Stop the producer after its current item and wait for it (a run that ends or is interrupted
        leaves no thread working inside the tokenizer or the allocator while the interpreter exits)."""
        import queue

        self._stop.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout)

    def __next__(self):
        item, error = self._queue.get()
        if error is not None:
            raise error
        if item is self._END:
            self._queue.put((self._END, None))
            raise StopIteration
        return item


def eval_batches(ds: datasets.Dataset, batch_size: int, n_batches: int, seed: int,
                 mask_draws: int = 1) -> list[list[dict]]:
    """A fixed list of validation batches (fixed masks too, via seeds), the same every evaluation. With
    `mask_draws` > 1 the same blocks come `mask_draws` times, each with other masks: more masked tokens
    for a tighter interval on the held-out accuracy (~15 % of the blocks' tokens per draw)."""
    n = min(len(ds), batch_size * n_batches)
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    return [
        [{"input_ids": ds[i]["input_ids"], "seed": example_seed(seed + 1, draw, i)} for i in idx[j : j + batch_size]]
        for draw in range(mask_draws)
        for j in range(0, n, batch_size)
    ]


# ---------------------------------------------------------------------------------------------- seed API
class MLMDataset(torch.utils.data.Dataset):
    """In-memory texts for MLM: each text tokenized ([CLS] ... [SEP]) and split into pieces of at most
    max_length tokens (never dropped). Items are {"input_ids", "seed"}; `MLMCollator` masks them."""

    def __init__(self, texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int = 128, seed: int = 0):
        self.sequences = tokenize_and_chunk({"text": list(texts)}, tokenizer, max_length, packing=False)["input_ids"]
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Masks are redrawn per epoch (the seed API's loaders call this for you)."""
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
    from distill.masking import MLMCollator
    from distill.recipes import MaskingConfig

    dataset = MLMDataset(texts, tokenizer, max_length, seed)
    collator = MLMCollator(tokenizer, MaskingConfig(probability=mask_probability, smoothing=0.0))
    return _EpochLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collator,
                        generator=torch.Generator().manual_seed(seed))
