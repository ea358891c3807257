"""The one accumulator's derived values against hand-computed numbers."""

import math

import numpy as np

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


# -- conditional power: when the planner stops measuring a move ---------------------------------
def test_conditional_power_matches_a_hand_computation():
    from statistics import NormalDist

    from analysis.budget import conditional_power
    gains, n = np.array([1.0, -1.0, 1.0, 3.0]), 10
    s = np.sqrt(8 / 3)  # sd of the four gains (mean 1, squared deviations 0, 4, 0, 4, ddof 1)
    z = NormalDist().inv_cdf(0.975)
    # the final sum over 10 images must exceed z * s * sqrt(10); the 6 images left add 6 * mean 1
    # with sd s * sqrt(6)
    above = 1 - NormalDist().cdf((z * s * np.sqrt(10) - 4 - 6) / (s * np.sqrt(6)))
    not_below = 1 - NormalDist().cdf((-z * s * np.sqrt(10) - 4 - 6) / (s * np.sqrt(6)))
    assert conditional_power(gains, n) == pytest.approx(above, rel=1e-9)
    assert conditional_power(gains, n, need="not_below") == pytest.approx(not_below, rel=1e-9)
    assert 0.4 < above < 0.6 and not_below > 0.99
    # every image measured: the final test itself, 1 or 0
    assert conditional_power(np.array([1.0, 1.2, 0.9]), 3) == 1.0
    assert conditional_power(np.array([1.0, -1.2, 0.1]), 3) == 0.0


def test_stopping_hopeless_moves_early_loses_few_good_ones_and_saves_most_of_the_null_ones():
    """Seeded simulation of the planner's rule (looks after 64, 128, 192 of 256 images, stop
    when the conditional power is below the planner's FUTILITY, 2 %): it can only reject (never keeps a move the full
    test rejects); a move with 80 % power on 256 images is stopped in few draws; a move with no
    effect is mostly stopped, at a fraction of the images."""
    from analysis.budget import conditional_power
    from analysis.planner import FUTILITY
    rng = np.random.default_rng(0)
    n, looks, draws = 256, (64, 128, 192), 2000
    z = 1.959964

    def run(effect):
        kept_full = stopped_good = 0
        images = []
        for _ in range(draws):
            d = rng.normal(effect, 1.0, n)
            full = d.mean() - z * d.std(ddof=1) / np.sqrt(n) > 0
            stop_at = next((k for k in looks if conditional_power(d[:k], n) < FUTILITY), None)
            kept_full += full
            stopped_good += full and stop_at is not None
            images.append(stop_at or n)
        return kept_full / draws, stopped_good / draws, float(np.mean(images))

    power_effect = (1.959964 + 0.841621) / np.sqrt(n)  # 80 % power at 256 images
    kept, lost, _ = run(power_effect)
    assert 0.75 < kept < 0.85
    assert lost < 0.065  # moves the full test would keep, stopped early (measured: 5 %)
    _, lost0, images0 = run(0.0)
    assert lost0 < 0.01 and images0 < 0.6 * n  # a null move: stopped early, at < 60 % of the images
    _, _, images_bad = run(-0.3)
    assert images_bad < 70  # a harmful move: stopped at the first look
