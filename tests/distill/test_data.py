import json

import datasets
import pytest
import torch

from distill import data as data_mod
from distill.data import (
    Background,
    GlobalBatchSampler,
    StreamingBatches,
    build_corpus,
    in_validation,
    load_documents,
    rank_slice,
    streaming_loader,
    tokenize_and_chunk,
)
from distill.masking import MLMCollator
from distill.recipes import DataConfig, MaskingConfig


@pytest.fixture
def jsonl_corpus(tmp_path):
    path = tmp_path / "docs.jsonl"
    texts = [f"document number {i} " + " ".join(f"w{i}x{j}" for j in range(i % 40 + 5)) for i in range(300)]
    path.write_text("\n".join(json.dumps({"body": t}) for t in texts))
    return path, texts


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def test_validation_split_is_deterministic_and_disjoint(jsonl_corpus, tokenizer):
    path, texts = jsonl_corpus
    cfg = DataConfig(source="files", files=[str(path)], text_field="body", num_proc=1, validation_fraction=0.1)
    a = build_corpus(cfg, tokenizer)
    b = build_corpus(cfg, tokenizer)
    assert a.validation["input_ids"] == b.validation["input_ids"]
    assert a.stats["train_documents"] + a.stats["validation_documents"] == 300
    held = {t for t in texts if in_validation(t, 0.1)}
    assert 10 < len(held) < 60 and a.stats["validation_documents"] == len(held)
    val_seqs = {tuple(x) for x in a.validation["input_ids"]}
    assert not val_seqs & {tuple(x) for x in a.train["input_ids"]}


def test_second_build_reuses_the_tokenization_cache(jsonl_corpus, tokenizer, monkeypatch):
    path, _ = jsonl_corpus
    cfg = DataConfig(source="files", files=[str(path)], text_field="body", num_proc=1)
    build_corpus(cfg, tokenizer)
    calls = []
    real = data_mod.tokenize_and_chunk
    monkeypatch.setattr(data_mod, "tokenize_and_chunk", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = build_corpus(cfg, tokenizer)
    assert not calls, "the corpus was tokenized again"
    assert again.stats["train_sequences"] > 0
    changed = build_corpus(DataConfig(**{**cfg.__dict__, "max_length": 32}), tokenizer)
    assert calls and changed.stats["train_sequences"] > again.stats["train_sequences"]


def test_documents_are_split_never_dropped(tokenizer):
    text = " ".join(["word"] * 300)
    out = tokenize_and_chunk({"text": [text, "short one", ""]}, tokenizer, max_length=64, packing=False)
    seqs = out["input_ids"]
    assert all(s[0] == tokenizer.cls_token_id and s[-1] == tokenizer.sep_token_id and len(s) <= 64 for s in seqs)
    body = sum(len(s) - 2 for s in seqs)
    assert body == 300 + len(tokenizer("short one", add_special_tokens=False)["input_ids"])


def test_packing_keeps_every_token(tokenizer):
    texts = [" ".join(["alpha"] * n) for n in (10, 70, 5, 200)]
    out = tokenize_and_chunk({"text": texts}, tokenizer, max_length=32, packing=True)
    seqs = out["input_ids"]
    assert all(len(s) == 32 for s in seqs[:-1]) and len(seqs[-1]) <= 32
    alpha = tokenizer.convert_tokens_to_ids("alpha")
    assert sum(s.count(alpha) for s in seqs) == 285


def test_offline_wiki_corpus_loads(tokenizer):
    docs = load_documents(DataConfig(max_documents=50))
    assert len(docs) == 50 and docs[0]["text"]


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


@pytest.mark.parametrize("fmt", ["txt", "parquet"])
def test_text_and_parquet_files(tmp_path, tokenizer, fmt):
    texts = [f"line {i} " + "word " * (i % 9 + 3) for i in range(60)]
    path = tmp_path / f"c.{fmt}"
    if fmt == "txt":
        path.write_text("\n".join(texts) + "\n")
    else:
        datasets.Dataset.from_dict({"text": texts}).to_parquet(str(path))
    corpus = build_corpus(DataConfig(source="files", files=[str(path)], num_proc=1, validation_fraction=0.2),
                          tokenizer)
    assert corpus.stats["train_documents"] + corpus.stats["validation_documents"] == 60


def test_bad_data_files_are_clear(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_documents(DataConfig(source="files", files=[str(tmp_path / "nope.jsonl")]))
    (tmp_path / "a.docx").write_text("x")
    with pytest.raises(ValueError, match="not supported"):
        load_documents(DataConfig(source="files", files=[str(tmp_path / "a.docx")]))
    (tmp_path / "b.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="no column 'text'"):
        load_documents(DataConfig(source="files", files=[str(tmp_path / "b.jsonl")]))


def test_eval_mask_draws_repeat_the_blocks_with_other_masks(tokenizer):
    import datasets

    from distill.data import eval_batches
    from distill.masking import MLMCollator
    from distill.recipes import MaskingConfig

    ds = datasets.Dataset.from_dict({"input_ids": [[101, *range(2000, 2060), 102]] * 10})
    one = eval_batches(ds, 4, 2, seed=3)
    three = eval_batches(ds, 4, 2, seed=3, mask_draws=3)
    assert len(three) == 3 * len(one) and three[: len(one)] == one  # the first draw is the single-draw list
    collate = MLMCollator(tokenizer, MaskingConfig(smoothing=0.0))
    labels = [collate(b)["labels"] for b in three]
    assert not torch.equal(labels[0], labels[2]) and torch.equal(collate(three[0])["labels"], labels[0])
