import json
from pathlib import Path

import pytest
import torch

from distill import adapt as adapt_mod
from distill.adapt import adapt_teacher
from distill.corpus import build_corpus, corpus_identity
from distill.recipes import AdaptConfig, DataConfig, MaskingConfig
from students.init import init_from_teacher
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


def _adapted_weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_an_interrupted_adaptation_resumes_to_the_same_teacher(tokenizer, small_corpus, tiny_teacher_dir, tmp_path,
                                                               monkeypatch):
    import os
    import signal

    from distill import checkpoint

    cfg, corpus = small_corpus
    adapt = AdaptConfig(steps=5, batch_size=4, eval_batches=1, save_every=2)
    ident = corpus_identity(cfg, tokenizer)
    teacher = str(tiny_teacher_dir)
    rng_before = torch.get_rng_state()
    whole = adapt_teacher(teacher, tokenizer, corpus, ident, adapt, MaskingConfig(), root=tmp_path / "a")
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's generator is left alone

    calls = []
    real = torch.nn.utils.clip_grad_norm_

    def interrupting(*a, **k):
        calls.append(1)
        if len(calls) == 4:  # Ctrl-C during step 4
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", interrupting)
    with pytest.raises(SystemExit) as stopped:
        adapt_teacher(teacher, tokenizer, corpus, ident, adapt, MaskingConfig(), root=tmp_path / "b")
    monkeypatch.undo()
    assert stopped.value.code == 128 + signal.SIGINT
    (partial,) = (tmp_path / "b" / "teachers").glob("*.partial")
    assert [p.name for p in checkpoint.checkpoint_dirs(partial)] == ["step-00000002", "step-00000004"]
    assert not (partial / ".lock").exists()
    # the newest adaptation checkpoint is damaged: it falls back to step 2, and still ends where `whole` did
    damaged = partial / "checkpoints" / "step-00000004" / "optimizer.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    resumed = adapt_teacher(teacher, tokenizer, corpus, ident, adapt, MaskingConfig(), root=tmp_path / "b")
    assert resumed.name == whole.name and not partial.exists()
    a, b = _adapted_weights(whole), _adapted_weights(resumed)
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) == 0.0
    ra, rb = (json.loads((p / "adapt_report.json").read_text()) for p in (whole, resumed))
    assert ra["before"] == rb["before"] and ra["after"] == rb["after"]


def test_a_run_beside_an_adaptation_in_progress_waits_for_it_and_reuses_its_teacher(
        tokenizer, small_corpus, tiny_teacher_dir, tmp_path, monkeypatch, caplog):
    """Two ablations started together: the second finds the first adapting the same teacher (its lock held by a
    live process) and neither fails nor adapts a second time; it takes the first's result once it is there."""
    import logging
    import socket

    from distill import rundir
    from tests.cli import popen

    cfg, corpus = small_corpus
    adapt = AdaptConfig(steps=2, batch_size=4, eval_batches=1)
    ident = corpus_identity(cfg, tokenizer)
    done = adapt_teacher(str(tiny_teacher_dir), tokenizer, corpus, ident, adapt, MaskingConfig(), root=tmp_path)
    # Back to the moment the first run was still adapting: no result yet, its lock in the partial directory,
    # held by a live process that (as the adaptation does) writes the result, then releases the lock.
    aside = done.with_name("finished")
    done.rename(aside)
    partial = done.with_name(done.name + ".partial")
    partial.mkdir()
    first = popen("-c", f"import os, time; time.sleep(1.5); os.rename({str(aside)!r}, {str(done)!r}); "
                  f"os.unlink({str(partial / '.lock')!r})", pipe=False)
    (partial / ".lock").write_text(json.dumps({"pid": first.pid, "host": socket.gethostname(),
                                               "start": rundir._start_time(first.pid), "since": "now"}))
    monkeypatch.setattr(adapt_mod, "LOCK_POLL_S", 0.1)
    monkeypatch.setattr(adapt_mod, "load_bert_mlm", lambda *a, **k: pytest.fail("adapted a second time"))
    try:
        with caplog.at_level(logging.INFO, logger="distill.rundir"):
            assert adapt_teacher(str(tiny_teacher_dir), tokenizer, corpus, ident, adapt, MaskingConfig(),
                                 root=tmp_path) == done
    finally:
        first.wait()
    assert first.returncode == 0 and (done / "adapt_report.json").exists()
    waits = [r.getMessage() for r in caplog.records if "waiting for it to end" in r.getMessage()]
    assert len(waits) == 1 and f"pid {first.pid}" in waits[0]  # one line, however long the wait
    assert not partial.exists()


def test_cached_adaptations_keep_their_keys_and_new_settings_enter_only_when_changed(tmp_path):
    import dataclasses
    import hashlib

    from distill.adapt import ADAPT_VERSION, adaptation_key, source_identity

    corpus_id = {"source": "wiki-summaries", "tokenizer": "abc"}
    default = AdaptConfig(steps=1200)
    # the key as the first version computed it, before the optimizer settings became recipe keys
    settings = {k: v for k, v in dataclasses.asdict(default).items()
                if k not in ("save_every", "betas", "eps", "clip_grad_norm")}
    payload = {"version": ADAPT_VERSION, "teacher": source_identity("minilm"), "adapt": settings,
               "masking": dataclasses.asdict(MaskingConfig(smoothing=0.0)), "corpus": corpus_id}
    before = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert adaptation_key("minilm", default, MaskingConfig(smoothing=0.0), corpus_id) == before
    changed = dataclasses.replace(default, betas=[0.9, 0.999])
    assert adaptation_key("minilm", changed, MaskingConfig(smoothing=0.0), corpus_id) != before
    assert adaptation_key("minilm", dataclasses.replace(default, save_every=7), MaskingConfig(smoothing=0.0),
                          corpus_id) == before


def test_the_teacher_identity_is_its_files_content_not_their_place_or_time(tiny_teacher_dir, tmp_path):
    import os
    import shutil

    from distill.adapt import source_identity

    copy = Path(shutil.copytree(tiny_teacher_dir, tmp_path / "reinstalled"))
    for p in copy.iterdir():
        os.utime(p, ns=(10**18, 10**18))  # a reinstall: same bytes, another directory, new mtimes
    assert source_identity(str(copy)) == source_identity(str(tiny_teacher_dir))
    config = copy / "config.json"
    config.write_text(config.read_text() + " ")  # one byte more
    assert source_identity(str(copy)) != source_identity(str(tiny_teacher_dir))
    assert source_identity("bert-base-uncased") == {"hub": "bert-base-uncased"}
