import datasets
import pytest

from distill import corpus as corpus_mod
from distill.corpus import build_corpus, in_validation, load_documents, tokenize_and_chunk
from distill.recipes import DataConfig


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
    real = corpus_mod.tokenize_and_chunk
    monkeypatch.setattr(corpus_mod, "tokenize_and_chunk", lambda *a, **k: calls.append(1) or real(*a, **k))
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
