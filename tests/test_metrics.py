"""The one accumulator's derived values against hand-computed numbers."""

import math

import pytest
import torch

from analysis.errors import ErrorSums
from analysis.metrics import OutputStats, drops, sqnr_db, sqnr_of_sums


def test_sqnr_of_sums_by_hand():
    assert sqnr_of_sums(100.0, 1.0) == pytest.approx(20.0)
    assert sqnr_of_sums(5.0, 0.0) == math.inf and sqnr_of_sums(0.0, 0.0) == math.inf
    assert sqnr_of_sums(0.0, 2.0) == -math.inf


def test_tensor_and_streamed_sqnr_agree_with_the_hand_value():
    ref, approx = torch.tensor([3.0, 4.0]), torch.tensor([3.0, 3.5])  # signal 25, noise 0.25
    sums = ErrorSums()
    sums.update(ref[:1], approx[:1])
    sums.update(ref[1:], approx[1:])
    assert sqnr_db(ref, approx) == pytest.approx(20.0)
    assert sums.metrics()["sqnr_db"] == pytest.approx(20.0)
    assert sqnr_db(torch.zeros(2), torch.ones(2)) == -math.inf


def test_drops_and_standard_errors_by_hand():
    # 4 images: FP32 gets images 0-2 right, the config images 0 and 3
    fp32 = OutputStats({"top1": [1, 1, 1, 0], "top5": [1] * 4, "agree": [1] * 4, "kl": [0] * 4,
                        "mse": [0] * 4, "signal": [1] * 4, "noise": [0] * 4})
    q = OutputStats({"top1": [1, 0, 0, 1], "top5": [1, 1, 0, 1], "agree": [1, 0, 0, 0], "kl": [0.1, 0.2, 0.3, 0.2],
                     "mse": [0] * 4, "signal": [1] * 4, "noise": [0.01] * 4})
    s = q.summary(fp32)
    assert (s["top1"], s["top1_drop"], s["top5_drop"]) == (50.0, 25.0, 25.0)
    assert list(s)[:5] == ["images", "top1", "top5", "top1_drop", "top5_drop"]
    assert drops({"top1": 70.0, "top5": 90.0}, {"top1": 80.0, "top5": 95.0}) == {"top1_drop": 10.0, "top5_drop": 5.0}
    se = q.standard_errors(fp32)
    # paired differences 0, 1, 1, -1: mean 1/4, sample sd sqrt(11/12), SE sqrt(11/12)/2
    assert se["top1_drop_se"] == pytest.approx(100 * math.sqrt(11 / 12) / 2)
    assert se["agreement_se"] == pytest.approx(100 * 0.5 / 2)  # 1, 0, 0, 0: sd 0.5
    assert se["kl_se"] == pytest.approx(math.sqrt(0.02 / 3) / 2)  # deviations -.1, 0, .1, 0
    with pytest.raises(ValueError, match="same images"):
        q.standard_errors(OutputStats({k: v[:2] for k, v in fp32.values.items()}))
