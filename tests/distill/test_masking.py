import numpy as np
import pytest
import torch

from distill.masking import MLMCollator
from distill.recipes import MaskingConfig


def examples(tokenizer, n=400, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        body = rng.integers(1000, 30522, size=int(rng.integers(5, 120))).tolist()
        out.append({"input_ids": [tokenizer.cls_token_id, *body, tokenizer.sep_token_id], "seed": i})
    return out


def test_masking_rates_and_specials(tokenizer):
    coll = MLMCollator(tokenizer, MaskingConfig(smoothing=0.0))
    b = coll(examples(tokenizer))
    real = b["attention_mask"].bool()
    selected = b["labels"] != -100
    special = torch.isin(b["labels"].where(selected, 0), torch.tensor(tokenizer.all_special_ids)) & selected
    assert not special.any(), "a special token was selected"
    assert not (selected & ~real).any(), "a padding position was selected"
    orig_cls = b["input_ids"][:, 0]
    assert (orig_cls == tokenizer.cls_token_id).all()
    maskable = real.sum() - 2 * len(real)
    rate = selected.sum().item() / maskable.item()
    assert abs(rate - 0.15) < 0.005, rate
    became = b["input_ids"][selected]
    target = b["labels"][selected]
    frac_mask = (became == tokenizer.mask_token_id).float().mean().item()
    frac_same = (became == target).float().mean().item()
    frac_rand = 1 - frac_mask - frac_same
    assert abs(frac_mask - 0.8) < 0.02 and abs(frac_same - 0.1) < 0.02 and abs(frac_rand - 0.1) < 0.02
    # Unselected positions are untouched.
    assert (b["input_ids"][real & ~selected] != tokenizer.mask_token_id).all()


def test_masking_is_deterministic_per_example(tokenizer):
    coll = MLMCollator(tokenizer, MaskingConfig())
    ex = examples(tokenizer, 6)
    a, b = coll(ex), coll(ex)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    # The same example masked alone (another batch composition, another process) gets the same mask.
    alone = coll([ex[3]])
    n = len(ex[3]["input_ids"])
    assert torch.equal(alone["labels"][0, :n], a["labels"][3, :n])
    reseeded = coll([{**e, "seed": e["seed"] + 1000} for e in ex])
    assert not torch.equal(reseeded["labels"], a["labels"])


def test_smoothing_raises_rare_token_share(tokenizer):
    rng = np.random.default_rng(1)
    # A corpus where half the positions hold one frequent token and half hold rare ones.
    counts = np.ones(len(tokenizer), dtype=np.int64)
    counts[2000] = 10**6
    exs = []
    for i in range(300):
        body = [2000 if rng.random() < 0.5 else int(rng.integers(3000, 30000)) for _ in range(60)]
        exs.append({"input_ids": [101, *body, 102], "seed": i})
    share = {}
    for s in (0.0, 0.7):
        b = MLMCollator(tokenizer, MaskingConfig(smoothing=s), counts)(exs)
        sel = b["labels"][b["labels"] != -100]
        share[s] = (sel != 2000).float().mean().item()
    assert share[0.0] == pytest.approx(0.5, abs=0.03)
    assert share[0.7] > 0.95


def test_padding_to_multiple(tokenizer):
    b = MLMCollator(tokenizer, MaskingConfig())([{"input_ids": [101, 2000, 102], "seed": 0}])
    assert b["input_ids"].shape == (1, 8) and b["attention_mask"].sum() == 3
