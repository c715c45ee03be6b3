import json

import pytest
import torch
import transformers
from transformers import DistilBertConfig

from students import (
    DistilBERTForMaskedLM,
    DistilBERTForSequenceClassification,
    DistilBERTModel,
    count_parameters,
    create_model_config,
)

# An odd config: not a preset, relu, sinusoidal positions, odd vocab, 3 heads of 16.
ODD = dict(vocab_size=97, dim=48, n_layers=3, n_heads=3, hidden_dim=80, max_position_embeddings=40,
           activation="relu", sinusoidal_pos_embds=True, pad_token_id=0)


def padded_batch(vocab_size: int, B: int = 3, T: int = 17) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, vocab_size, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 11:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    return ids, mask


PAIRS = [
    (DistilBERTForMaskedLM, transformers.DistilBertForMaskedLM),
    (DistilBERTForSequenceClassification, transformers.DistilBertForSequenceClassification),
    (DistilBERTModel, transformers.DistilBertModel),
]


@pytest.mark.parametrize("ours,theirs", PAIRS)
def test_state_dict_contract(ours, theirs):
    config = create_model_config("distilbert-base-uncased (66M)")
    a = {k: tuple(v.shape) for k, v in ours(config).state_dict().items()}
    b = {k: tuple(v.shape) for k, v in theirs(config).state_dict().items()}
    assert a == b


def test_base_preset_parameter_count():
    config = create_model_config("distilbert-base-uncased (66M)")
    assert count_parameters(DistilBERTForMaskedLM(config)) == 66_985_530
    assert count_parameters(DistilBERTModel(config)) == sum(
        p.numel() for p in transformers.DistilBertModel(config).parameters()
    )


@pytest.mark.parametrize("config", [create_model_config("distilbert-base-uncased (66M)", n_layers=2),
                                    DistilBertConfig(**ODD)], ids=["preset", "odd"])
@pytest.mark.parametrize("ours,theirs", PAIRS[:2])
def test_logits_match_transformers_on_padded_batch(config, ours, theirs):
    config.num_labels = 5
    model = ours(config).eval()
    ref = theirs(config).eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    ids, mask = padded_batch(config.vocab_size)
    with torch.no_grad():
        a = model(ids, attention_mask=mask, output_hidden_states=True)
        b = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    real = mask.bool() if a.logits.dim() == 3 else slice(None)
    torch.testing.assert_close(a.logits[real], b.logits[real], atol=1e-5, rtol=0)
    assert len(a.hidden_states) == len(b.hidden_states) == config.n_layers + 1
    for x, y in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(x[mask.bool()], y[mask.bool()], atol=1e-5, rtol=0)


def test_attention_probabilities_match_eager_transformers():
    config = DistilBertConfig(**ODD)
    model = DistilBERTModel(config).eval()
    ref = transformers.DistilBertModel(DistilBertConfig(**ODD, attn_implementation="eager")).eval()
    ref.load_state_dict(model.state_dict())
    ids, mask = padded_batch(config.vocab_size)
    with torch.no_grad():
        a = model(ids, mask, output_attentions=True)
        b = ref(input_ids=ids, attention_mask=mask, output_attentions=True)
        plain = model(ids, mask)
    # The explicit-probabilities path and the fused SDPA path give the same states.
    torch.testing.assert_close(a.last_hidden_state, plain.last_hidden_state, atol=1e-5, rtol=0)
    for x, y in zip(a.attentions, b.attentions):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    assert a.attentions[0][2, :, :, 4:].abs().max() == 0  # padded keys get no attention


def test_loss_follows_transformers_convention():
    config = DistilBertConfig(**ODD)
    model = DistilBERTForMaskedLM(config).eval()
    ids, mask = padded_batch(config.vocab_size)
    labels = torch.full_like(ids, -100)
    labels[0, 3] = 5
    labels[1, 7] = 9
    out = model(ids, mask, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits[labels != -100], labels[labels != -100])
    torch.testing.assert_close(out.loss, expected)


def test_save_pretrained_loads_in_transformers(tmp_path):
    config = DistilBertConfig(**ODD)
    model = DistilBERTForMaskedLM(config).eval()
    model.save_pretrained(tmp_path)
    ref, info = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(ref, transformers.DistilBertForMaskedLM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids, mask = padded_batch(config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask).logits, ref.eval()(input_ids=ids, attention_mask=mask).logits,
                                   atol=1e-5, rtol=0)


def test_from_pretrained_reads_transformers_directory(tmp_path):
    config = DistilBertConfig(**ODD, num_labels=4)
    ref = transformers.DistilBertForSequenceClassification(config).eval()
    ref.save_pretrained(tmp_path)
    model = DistilBERTForSequenceClassification.from_pretrained(tmp_path).eval()
    ids, mask = padded_batch(config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask).logits, ref(input_ids=ids, attention_mask=mask).logits,
                                   atol=1e-5, rtol=0)


def test_classifier_from_mlm_checkpoint_gets_fresh_head(tmp_path):
    mlm = DistilBERTForMaskedLM(DistilBertConfig(**ODD))
    mlm.save_pretrained(tmp_path)
    clf = DistilBERTForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    assert clf.classifier.out_features == 3
    torch.testing.assert_close(clf.distilbert.state_dict(), mlm.distilbert.state_dict())


def test_tied_projection_after_load(tmp_path):
    mlm = DistilBERTForMaskedLM(DistilBertConfig(**ODD))
    mlm.save_pretrained(tmp_path)
    loaded = DistilBERTForMaskedLM.from_pretrained(tmp_path)
    assert loaded.vocab_projector.weight is loaded.distilbert.embeddings.word_embeddings.weight


def test_mismatched_checkpoint_is_refused(tmp_path):
    DistilBERTForMaskedLM(DistilBertConfig(**ODD)).save_pretrained(tmp_path)
    with pytest.raises((ValueError, RuntimeError), match="ignore_mismatched_sizes|shape"):
        DistilBERTForMaskedLM.from_pretrained(tmp_path, config=DistilBertConfig(**{**ODD, "dim": 24}))
    with pytest.raises(FileNotFoundError):
        DistilBERTForMaskedLM.from_pretrained(tmp_path / "nope")


def test_too_long_input_is_a_clear_error():
    model = DistilBERTModel(DistilBertConfig(**ODD))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.ones(1, 41, dtype=torch.long))


def test_student_classes_are_transformers_pretrained_models(tmp_path):
    import students

    assert students.init_from_teacher is not None  # importable from the package, as the README's example does
    config = DistilBertConfig(**ODD)
    clf = DistilBERTForSequenceClassification(config, num_labels=5)  # config overrides, as transformers' classes
    assert clf.classifier.out_features == 5 and clf.config.num_labels == 5 and config.num_labels == 2
    assert isinstance(clf, transformers.PreTrainedModel) and callable(clf.push_to_hub)
    with pytest.raises(TypeError, match="not a DistilBertConfig field"):
        DistilBERTForSequenceClassification(config, num_lables=2)
    mlm = DistilBERTForMaskedLM(config).to(torch.bfloat16)
    mlm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["DistilBertForMaskedLM"] and saved["dtype"] == "bfloat16"
    loaded = DistilBERTForMaskedLM.from_pretrained(tmp_path, dtype=torch.float32)  # the library's options
    assert loaded.dtype == torch.float32
    assert loaded.vocab_projector.weight is loaded.distilbert.embeddings.word_embeddings.weight


def test_from_pretrained_refuses_foreign_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    DistilBERTForMaskedLM(DistilBertConfig(**ODD)).save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["distilbert.transformer.layer.0.attention.extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected tensors"):
        DistilBERTForMaskedLM.from_pretrained(tmp_path)
