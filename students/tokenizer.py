"""Tokenizer loading: a local directory, a hub name, or the offline bert-base-uncased vocabulary."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from resources import minilm_dir

logger = logging.getLogger(__name__)

# Short names of the uncased English WordPiece vocabulary (30,522 tokens) shared by bert-base-uncased,
# distilbert-base-uncased and all-MiniLM-L6-v2; they resolve to the copy installed with the offline model.
OFFLINE_VOCAB_NAMES = ("distilbert-base-uncased", "bert-base-uncased", "wordpiece-uncased")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


def get_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """A fast tokenizer with the full vocabulary, returning `input_ids` and `attention_mask`.

    - a directory: loaded from it (`from_pretrained(dir)`; never `vocab_file=`, which in transformers 5
      silently builds a 5-token vocabulary);
    - one of `OFFLINE_VOCAB_NAMES`: the packaged bert-base-uncased WordPiece vocabulary (no network);
    - any other name: a hub repository (needs the network or the HF cache).
    Truncation is never switched on implicitly; the data pipeline splits long documents itself.
    """
    source = Path(name_or_path)
    if str(name_or_path) in OFFLINE_VOCAB_NAMES:
        source = minilm_dir()
        logger.info("tokenizer %r: using the packaged uncased WordPiece vocabulary at %s", name_or_path, source)
    elif source.is_dir():
        if not any((source / f).exists() for f in TOKENIZER_FILES):
            # transformers would build a default tokenizer with a near-empty vocabulary here.
            raise FileNotFoundError(f"tokenizer {name_or_path}: the directory has none of {TOKENIZER_FILES}")
    else:
        if source.exists() or str(name_or_path).startswith((".", "/")):
            raise FileNotFoundError(f"tokenizer {name_or_path}: not a directory with tokenizer files")
        source = name_or_path
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    if not tokenizer.is_fast:
        raise ValueError(f"tokenizer {name_or_path}: no fast (tokenizers) version found; add a tokenizer.json")
    tokenizer.backend_tokenizer.no_truncation()  # some packaged tokenizer.json files carry a max_length
    if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError(f"tokenizer {name_or_path}: an MLM tokenizer needs [MASK] and [PAD] tokens")
    # DistilBERT takes no token_type_ids; BERT teachers default them to zeros.
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    return tokenizer
