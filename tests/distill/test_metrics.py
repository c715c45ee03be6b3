import base64

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from distill.metrics import (
    compute_classification_loss,
    compute_confusion_matrix,
    compute_mlm_loss,
    compute_precision_recall_f1,
    masked_lm_metrics,
    masked_lm_scores,
    pack_correct,
    unpack_correct,
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, 300)
    p = np.where(rng.random(300) < 0.6, y, rng.integers(0, 5, 300))
    p[p == 4] = 3  # class 4 never predicted: zero-division path
    ours = compute_precision_recall_f1(y, p, num_classes=5)
    for avg in ("macro", "micro", "weighted"):
        P, R, F, _ = precision_recall_fscore_support(y, p, average=avg, labels=range(5), zero_division=0)
        assert ours[avg]["precision"] == pytest.approx(P) and ours[avg]["recall"] == pytest.approx(R)
        assert ours[avg]["f1"] == pytest.approx(F)
    P, R, F, S = precision_recall_fscore_support(y, p, labels=range(5), zero_division=0)
    assert ours["per_class"]["f1"] == pytest.approx(F.tolist()) and ours["per_class"]["support"] == S.tolist()
    assert compute_confusion_matrix(y, p, 5).tolist() == confusion_matrix(y, p, labels=range(5)).tolist()
    assert ours["macro"]["f1"] == pytest.approx(f1_score(y, p, average="macro", labels=range(5), zero_division=0))


def test_confusion_matrix_infers_classes_and_checks_lengths():
    assert compute_confusion_matrix([0, 2], [2, 2]).shape == (3, 3)
    with pytest.raises(ValueError, match="2 labels but 3 predictions"):
        compute_confusion_matrix([0, 1], [0, 1, 1])


def test_losses_follow_conventions():
    logits = torch.randn(2, 3, 7)
    labels = torch.tensor([[1, -100, 3], [-100, -100, 6]])
    keep = labels != -100
    torch.testing.assert_close(compute_mlm_loss(logits, labels),
                               torch.nn.functional.cross_entropy(logits[keep], labels[keep]))
    cls = torch.randn(4, 3)
    y = torch.tensor([0, 2, 1, 1])
    torch.testing.assert_close(compute_classification_loss(cls, y), torch.nn.functional.cross_entropy(cls, y))


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 87_628])
def test_per_token_correctness_packs_to_bits_and_back(n):
    correct = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.37
    text = pack_correct(correct)
    raw = base64.b64decode(text)
    assert len(raw) == -(-n // 8)  # 8 tokens a byte
    assert torch.equal(unpack_correct(text, n), correct)
    # the layout is numpy's packbits (first token = high bit of the first byte)
    assert np.array_equal(np.frombuffer(raw, np.uint8), np.packbits(correct.numpy()))
    with pytest.raises(ValueError, match="bits"):
        unpack_correct(text, n + 8)


class _Lookup(torch.nn.Module):
    """A masked LM that predicts from a fixed table of logits per token id (encode = one-hot ids)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))

    def encode(self, input_ids, attention_mask):
        return torch.nn.functional.one_hot(input_ids, self.table.size(0)).float()

    def predict_tokens(self, hidden):
        return hidden @ self.table


def _batches(seed: int, n: int = 3, vocab: int = 11):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (4, 9), generator=g)
        labels = torch.where(torch.rand(4, 9, generator=g) < 0.3, torch.randint(0, vocab, (4, 9), generator=g), -100)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def test_masked_lm_scores_per_token_and_their_fingerprint():
    model = _Lookup(11)
    batches = _batches(0)
    scores = masked_lm_scores(model, batches, torch.device("cpu"))
    # per token, in batch order: argmax of the table row of the input id equals the label
    rows = [b["labels"] != -100 for b in batches]
    expect = torch.cat([model.table[b["input_ids"][r]].argmax(-1) == b["labels"][r] for b, r in zip(batches, rows)])
    assert torch.equal(scores.correct, expect) and scores.correct.numel() == sum(int(r.sum()) for r in rows)
    metrics = masked_lm_metrics(model, batches, torch.device("cpu"))
    assert metrics == scores.metrics() and metrics["mlm_accuracy"] == pytest.approx(expect.double().mean().item())
    # the fingerprint names what was scored, not the model: equal for another model on the same batches,
    # different when one masked position or one input changes
    other = _Lookup(11)
    other.table.data.neg_()
    assert masked_lm_scores(other, batches, torch.device("cpu")).fingerprint == scores.fingerprint
    moved = [dict(b) for b in batches]
    moved[2] = {**moved[2], "labels": moved[2]["labels"].clone()}
    moved[2]["labels"][0, 0] = 3 if moved[2]["labels"][0, 0] == -100 else -100
    assert masked_lm_scores(model, moved, torch.device("cpu")).fingerprint != scores.fingerprint
    assert masked_lm_scores(model, _batches(1), torch.device("cpu")).fingerprint != scores.fingerprint
