import numpy as np
import pytest

from train.evaluate import topk_correct


def test_topk_correct():
    logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    labels = np.array([1, 2, 0])
    assert topk_correct(logits, labels, (1, 2, 3)) == {1: 1, 2: 1, 3: 3}
    with pytest.raises(ValueError, match="expected logits"):
        topk_correct(logits, labels[:2])
