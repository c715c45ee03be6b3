import json

import pytest
import torch

from distill.data import build_corpus, corpus_identity
from distill.recipes import AdaptConfig, DataConfig, MaskingConfig
from students.init import init_from_teacher
from teachers import adapt as adapt_mod
from teachers.adapt import adapt_teacher
from teachers.teacher import Teacher

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_corpus(tokenizer):
    cfg = DataConfig(max_documents=200, max_length=64, packing=True, num_proc=1)
    return cfg, build_corpus(cfg, tokenizer)


def test_adapting_the_packaged_minilm_then_exact_student(tokenizer, small_corpus, tmp_path, monkeypatch):
    cfg, corpus = small_corpus
    adapt = AdaptConfig(steps=3, batch_size=8, eval_batches=2)
    path = adapt_teacher("minilm", tokenizer, corpus, corpus_identity(cfg, tokenizer), adapt, MaskingConfig(),
                         root=tmp_path)
    report = json.loads((path / "adapt_report.json").read_text())
    assert report["steps"] == 3 and report["after"]["mlm_loss"] < report["before"]["mlm_loss"]
    assert "cls.predictions.transform.dense.weight" in report["new_head_tensors"]

    # Cached: a second call with the same inputs loads nothing and trains nothing.
    monkeypatch.setattr(adapt_mod, "load_bert_mlm", lambda *a, **k: pytest.fail("re-adapted"))
    assert adapt_teacher("minilm", tokenizer, corpus, corpus_identity(cfg, tokenizer), adapt, MaskingConfig(),
                         root=tmp_path) == path

    teacher = Teacher.load(str(path))
    teacher.check_tokenizer(tokenizer)
    student = init_from_teacher(teacher, layers=list(range(6))).eval()
    ids = torch.randint(1000, 30000, (3, 20))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    mask[2, 5:] = 0
    with torch.no_grad():
        expected = teacher.model(input_ids=ids, attention_mask=mask).logits
        got = student(ids, mask).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=0)
