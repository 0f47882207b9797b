"""Metrics against values worked out by hand."""
import math

import pytest
import torch

from subquad.tasks.train.metrics import confusion_matrix, segmentation_scores, topk_correct


def test_segmentation_scores_match_a_hand_computed_confusion_matrix():
    # 5 classes; 255 is ignored. Class 3 is predicted once but never labelled, class 4 appears nowhere.
    label = torch.tensor([[0, 0, 1, 1], [2, 255, 0, 1], [2, 255, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 2], [3, 4, 4, 4]])
    confusion = confusion_matrix(pred, label, num_classes=5)
    expected = torch.tensor([
        [2, 1, 0, 0, 0],        # labelled 0: twice right, once called 1
        [0, 2, 1, 0, 0],        # labelled 1: twice right, once called 2
        [1, 0, 0, 1, 0],        # labelled 2: called 0 and 3
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
    ])
    assert torch.equal(confusion, expected)
    scores = segmentation_scores(confusion, ["a", "b", "c", "d", "e"])
    # IoU = TP / (labelled + predicted - TP): a 2/4, b 2/4, c 0/3, d 0/1, e 0/0 (NaN, left out of the mean)
    assert scores["mIoU"] == pytest.approx(100 * (0.5 + 0.5 + 0 + 0) / 4)
    # Acc = TP / labelled: a 2/3, b 2/3, c 0/2, d and e 0/0 (NaN)
    assert scores["mAcc"] == pytest.approx(100 * (2 / 3 + 2 / 3 + 0) / 3)
    assert scores["aAcc"] == pytest.approx(100 * 4 / 8)
    assert scores["per_class"]["a"] == pytest.approx({"IoU": 50.0, "Acc": 100 * 2 / 3})
    assert scores["per_class"]["d"]["IoU"] == 0.0 and math.isnan(scores["per_class"]["d"]["Acc"])
    assert math.isnan(scores["per_class"]["e"]["IoU"])


def test_confusion_matrix_refuses_labels_out_of_range():
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\) or 255, got \[0, 7\]"):
        confusion_matrix(torch.zeros(2, dtype=torch.long), torch.tensor([0, 7]), num_classes=3)


def test_topk_correct_counts_rows_with_the_target_among_the_k_largest():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.5],      # order 1, 3, 0, 2
                           [0.8, 0.1, 0.3, 0.2],      # order 0, 2, 3, 1
                           [0.0, 0.1, 0.2, 0.3]])     # order 3, 2, 1, 0
    target = torch.tensor([1, 2, 0])
    assert topk_correct(logits, target, (1, 2, 4)).tolist() == [1, 2, 3]
    assert topk_correct(logits, target, (1, 5)).tolist() == [1, 3]          # k above the class count: all classes
