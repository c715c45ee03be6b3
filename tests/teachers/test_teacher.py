import pytest
import torch
from transformers import BertConfig, BertModel

from teachers.teacher import Teacher, TeacherError
from tests.conftest import make_tiny_teacher


def test_teacher_is_frozen_and_gives_all_hidden_states(tiny_teacher_dir):
    t = Teacher.load(str(tiny_teacher_dir))
    assert not t.model.training and not any(p.requires_grad for p in t.model.parameters())
    ids = torch.randint(1000, 2000, (2, 9))
    mask = torch.ones_like(ids)
    out = t(ids, mask)
    assert len(out.hidden_states) == 5 and out.last_hidden_state.is_inference()
    with torch.no_grad():
        ref = t.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(t.predict_tokens(out.last_hidden_state), ref)


def test_attentions_on_request(tiny_teacher_dir):
    t = Teacher.load(str(tiny_teacher_dir), attn_implementation="eager")
    out = t(torch.randint(1000, 2000, (1, 6)), torch.ones(1, 6, dtype=torch.long), output_attentions=True)
    assert len(out.attentions) == 4 and out.attentions[0].shape == (1, 2, 6, 6)


def test_vocabulary_mismatch_is_refused(tokenizer, tmp_path):
    small = tmp_path / "small"
    cfg = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    from transformers import BertForMaskedLM

    BertForMaskedLM(cfg).save_pretrained(small)
    with pytest.raises(TeacherError, match="vocabulary mismatch.*100 tokens"):
        Teacher.load(str(small)).check_tokenizer(tokenizer)
    # Same size, different token -> id table.
    swapped = make_tiny_teacher(tmp_path / "swapped", layers=1)
    vocab = tokenizer.get_vocab()
    inv = sorted(vocab, key=vocab.get)
    inv[2000], inv[2001] = inv[2001], inv[2000]
    (swapped / "tokenizer.json").unlink()
    (swapped / "vocab.txt").write_text("\n".join(inv) + "\n")
    with pytest.raises(TeacherError, match="different ids"):
        Teacher.load(str(swapped)).check_tokenizer(tokenizer)


def test_teacher_without_tokenizer_is_checked_by_size(tokenizer, tmp_path, caplog):
    cfg = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    from transformers import BertForMaskedLM

    BertForMaskedLM(cfg).save_pretrained(tmp_path)
    Teacher.load(str(tmp_path)).check_tokenizer(tokenizer)
    assert "vocabulary size only" in caplog.text


def test_headless_checkpoint_needs_adaptation(tmp_path):
    cfg = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(TeacherError, match="no trained MLM head.*teacher.adapt.steps"):
        Teacher.load(str(tmp_path))


def test_missing_teacher_is_a_clear_error():
    with pytest.raises(TeacherError, match="directory not found"):
        Teacher.load("./no/such/teacher")
    with pytest.raises(TeacherError, match="could not be loaded"):
        Teacher.load("no-such-org/no-such-model")
