"""Feeding global batches to every process: a seeded sampler of global batches with an (epoch, batch)
position, each process's contiguous slice, per-example masking seeds, streams, and the fixed held-out
batches of evaluation.

Each process sees the same sequence of *global* batches and takes its own slice, so a run's data, masks
and losses do not depend on the number of processes, and resuming is an O(1) jump to batch k rather than
a replay.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Any

import datasets
import numpy as np
import torch

from distill.corpus import stable_hash


# ---------------------------------------------------------------------------------------------- batching
class GlobalBatchSampler:
    """Seeded global batches of dataset indices, with an (epoch, batch) position for exact resume.

    group_by_length=True sorts each window of 50 batches by length and shuffles the batches (the original
    `distillation/` scripts group by length to cut padding); with packing all lengths are equal and it is a
    no-op.
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
    return stable_hash(f"{seed}/{epoch}/{index}") >> 1


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


