import datasets
import pytest
import torch

from distill.batching import (
    Background,
    GlobalBatchSampler,
    StreamingBatches,
    eval_batches,
    rank_slice,
    streaming_loader,
)
from distill.corpus import build_corpus
from distill.masking import MLMCollator
from distill.recipes import DataConfig, MaskingConfig


def test_global_batches_slice_and_resume():
    lengths = [5 + (i * 7) % 50 for i in range(103)]
    s = GlobalBatchSampler(lengths, batch_size=8, seed=3, group_by_length=True)
    it = s.iterate()
    first = [next(it) for _ in range(30)]  # crosses an epoch boundary (12 batches per epoch)
    resumed = s.iterate(start=17)
    assert [next(resumed) for _ in range(13)] == first[17:]
    epoch0 = {i for b in first[:12] for _, i in b}
    assert len(epoch0) == 96  # no repeats within an epoch
    assert first[0] != first[12]  # a new shuffle each epoch
    b = first[0]
    assert rank_slice(b, 0, 2) + rank_slice(b, 1, 2) == b
    with pytest.raises(ValueError, match="multiple"):
        rank_slice(b, 0, 3)


def test_streaming_batches_and_resume(jsonl_corpus, tokenizer):
    path, _ = jsonl_corpus
    cfg = DataConfig(source="files", files=[str(path)], text_field="body", streaming=True, max_length=64)
    corpus = build_corpus(cfg, tokenizer)
    assert len(corpus.validation) > 0
    stream = StreamingBatches(corpus.train, batch_size=4, seed=0, buffer_size=50)
    it = stream.iterate()
    first = [next(it) for _ in range(5)]
    it2 = stream.iterate(start=3)
    assert [next(it2) for _ in range(2)] == first[3:]
    assert all(len(b) == 4 for b in first)


def test_background_stream_is_the_same_stream(jsonl_corpus, tokenizer):
    path, _ = jsonl_corpus
    cfg = DataConfig(source="files", files=[str(path)], text_field="body", streaming=True, max_length=64)
    corpus = build_corpus(cfg, tokenizer)
    collator = MLMCollator(tokenizer, MaskingConfig())
    stream = StreamingBatches(corpus.train, batch_size=4, seed=0, buffer_size=50)
    fg = streaming_loader(stream, collator, 1, 2, start_batch=2)
    bg = streaming_loader(stream, collator, 1, 2, start_batch=2, prefetch=3)
    assert isinstance(bg, Background)
    for _ in range(6):  # more than one epoch of this small corpus
        a, b = next(fg), next(bg)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_background_raises_the_producers_error_in_order():
    def items():
        yield 1
        yield 2
        raise ValueError("bad document 3")

    it = Background(items(), depth=5)
    assert [next(it), next(it)] == [1, 2]
    with pytest.raises(ValueError, match="bad document 3"):
        next(it)
    assert list(Background(iter([7, 8]), depth=1)) == [7, 8]
    # close() stops a producer that is blocked on a full queue, and returns once it has ended
    endless = Background(iter(range(10**9)), depth=2)
    assert next(endless) == 0
    endless.close(timeout=5)
    assert not endless._thread.is_alive()


def test_eval_mask_draws_repeat_the_blocks_with_other_masks(tokenizer):
    ds = datasets.Dataset.from_dict({"input_ids": [[101, *range(2000, 2060), 102]] * 10})
    one = eval_batches(ds, 4, 2, seed=3)
    three = eval_batches(ds, 4, 2, seed=3, mask_draws=3)
    assert len(three) == 3 * len(one) and three[: len(one)] == one  # the first draw is the single-draw list
    collate = MLMCollator(tokenizer, MaskingConfig(smoothing=0.0))
    labels = [collate(b)["labels"] for b in three]
    assert not torch.equal(labels[0], labels[2]) and torch.equal(collate(three[0])["labels"], labels[0])
