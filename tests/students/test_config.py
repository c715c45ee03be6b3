import pytest
from transformers import BertConfig

from students import DistilBERTModel, config_from_teacher, count_parameters, create_model_config


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="did you mean 'distilbert-base-uncased \\(66M\\)'") as e:
        create_model_config("distilbert-base-uncased")
    assert "'tiny'" in str(e.value)


def test_overrides_and_preset_fields():
    c = create_model_config("distilbert-base-uncased (66M)", n_layers=3)
    assert (c.vocab_size, c.dim, c.n_layers, c.n_heads, c.hidden_dim, c.max_position_embeddings) == (
        30522, 768, 3, 12, 3072, 512)


def test_config_from_teacher_halves_depth():
    t = BertConfig(hidden_size=384, num_attention_heads=12, intermediate_size=1536, num_hidden_layers=6)
    c = config_from_teacher(t)
    assert (c.dim, c.n_heads, c.hidden_dim, c.n_layers, c.vocab_size) == (384, 12, 1536, 3, 30522)
    assert config_from_teacher(t, n_layers=6).n_layers == 6
    with pytest.raises(ValueError, match="hidden_act"):
        config_from_teacher(BertConfig(hidden_act="silu"))
    with pytest.raises(ValueError, match="layer_norm_eps"):
        config_from_teacher(BertConfig(layer_norm_eps=1e-5))


def test_seed_readme_example():
    from distilbert_kit import DistilBERTModel as Exported
    from distilbert_kit import count_parameters as cp
    from distilbert_kit import create_model_config as cmc

    assert Exported is DistilBERTModel and cp is count_parameters and cmc is create_model_config
    n = count_parameters(DistilBERTModel(create_model_config("distilbert-base-uncased (66M)")))
    assert 66_000_000 < n < 67_000_000
