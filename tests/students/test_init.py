import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, DistilBertConfig

from students import DistilBERTForMaskedLM
from students.init import DROPPED, EMBEDDING_AND_HEAD_MAP, default_layers, init_from_teacher, key_mapping


def random_bert(layers=4, hidden=48, heads=3, vocab=120):
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=80, max_position_embeddings=40)
    model = BertForMaskedLM(cfg).eval()
    with torch.no_grad():  # non-trivial values everywhere, token-type row 0 included
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def padded(vocab, B=3, T=15):
    ids = torch.randint(1, vocab, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 3:] = 0
    return ids, mask


def test_mapping_contract_every_teacher_tensor_accounted_for():
    teacher = random_bert(layers=4)
    mapping = key_mapping(list(range(4)))
    used = set(mapping.values())
    teacher_keys = set(teacher.state_dict())
    assert used <= teacher_keys
    unaccounted = teacher_keys - used - set(DROPPED)
    assert not unaccounted, unaccounted
    student_keys = set(DistilBERTForMaskedLM(init_from_teacher(teacher).config).state_dict())
    assert set(key_mapping(default_layers(4, 2))) == student_keys - {"vocab_projector.weight"}
    assert len(EMBEDDING_AND_HEAD_MAP) == 9 and len(mapping) == 9 + 4 * 16


def test_default_layers():
    assert default_layers(12, 6) == [0, 2, 4, 7, 9, 11]
    assert default_layers(6, 3) == [0, 2, 5]
    assert default_layers(4, 1) == [3]
    assert default_layers(12, 4) == [0, 4, 7, 11]


def test_all_layers_reproduce_teacher_logits():
    teacher = random_bert()
    student = init_from_teacher(teacher, layers=[0, 1, 2, 3]).eval()
    ids, mask = padded(120)
    with torch.no_grad():
        expected = teacher(input_ids=ids, attention_mask=mask).logits
        got = student(ids, mask).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=0)


def test_embedding_output_equals_teacher_thanks_to_token_type_fold():
    teacher = random_bert()
    student = init_from_teacher(teacher).eval()
    ids, _ = padded(120)
    with torch.no_grad():
        torch.testing.assert_close(student.distilbert.embeddings(ids), teacher.bert.embeddings(input_ids=ids),
                                   atol=1e-6, rtol=0)


def test_layer_subset_copies_the_chosen_layers():
    teacher = random_bert(layers=4)
    student = init_from_teacher(teacher, layers=[1, 3])
    torch.testing.assert_close(student.distilbert.transformer.layer[1].ffn.lin2.weight,
                               teacher.bert.encoder.layer[3].output.dense.weight)
    assert student.config.n_layers == 2


def test_incompatible_teachers_and_layers_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        init_from_teacher(random_bert(layers=4), layers=[0, 4])
    bad = random_bert()
    bad.config.hidden_act = "silu"
    with pytest.raises(ValueError, match="hidden_act"):
        init_from_teacher(bad)


def test_student_config_with_other_width_or_heads_is_refused():
    teacher = random_bert(layers=4, hidden=48, heads=3)
    fits = init_from_teacher(teacher, layers=[0, 3], config=DistilBertConfig(
        vocab_size=120, dim=48, n_heads=3, hidden_dim=80, n_layers=2, max_position_embeddings=40))
    assert fits.config.dim == 48 and fits.config.n_layers == 2
    wide = DistilBertConfig(vocab_size=120, dim=64, n_heads=4, hidden_dim=80, n_layers=2, max_position_embeddings=40)
    with pytest.raises(ValueError, match=r"student dim=64 vs teacher hidden_size=48; "
                                         r"student n_heads=4 vs teacher num_attention_heads=3"):
        init_from_teacher(teacher, layers=[0, 3], config=wide)
    deeper = DistilBertConfig(vocab_size=120, dim=48, n_heads=3, hidden_dim=80, n_layers=3, max_position_embeddings=40)
    with pytest.raises(ValueError, match="n_layers=3 but 2 teacher layers"):
        init_from_teacher(teacher, layers=[0, 3], config=deeper)
