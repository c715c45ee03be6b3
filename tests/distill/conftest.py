import json

import datasets
import pytest


@pytest.fixture
def jsonl_corpus(tmp_path):
    path = tmp_path / "docs.jsonl"
    texts = [f"document number {i} " + " ".join(f"w{i}x{j}" for j in range(i % 40 + 5)) for i in range(300)]
    path.write_text("\n".join(json.dumps({"body": t}) for t in texts))
    return path, texts


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
