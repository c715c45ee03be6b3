import os

# No network in tests: everything comes from local files and the offline packages.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels run in Triton's interpreter where there is no GPU (read when Triton first loads).
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer():
    from students.tokenizer import get_tokenizer

    return get_tokenizer("distilbert-base-uncased")


def make_tiny_teacher(path, layers: int = 4, hidden: int = 32, heads: int = 2, seed: int = 0):
    """A random BertForMaskedLM with the real 30,522-token vocabulary and its tokenizer, saved to path."""
    from transformers import BertConfig, BertForMaskedLM

    from students.tokenizer import get_tokenizer

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * hidden, max_position_embeddings=128)
    model = BertForMaskedLM(config).eval()
    model.save_pretrained(path)
    get_tokenizer("distilbert-base-uncased").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("tiny_teacher"))
