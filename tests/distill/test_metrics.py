import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from distill.metrics import (
    compute_classification_loss,
    compute_confusion_matrix,
    compute_mlm_loss,
    compute_precision_recall_f1,
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
