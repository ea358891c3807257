import math

import pytest
import torch

from quant.observers import (
    NonFiniteError,
    StreamingHistogram,
    activation_qparams,
    entropy_range,
    mean_minmax_range,
    minmax_range,
    mse_range,
    percentile_range,
    weight_qparams,
)
from quant.quantizer import QuantSpec, fake_quantize, qparams_from_range


def _hist(*tensors):
    h = StreamingHistogram()
    for t in tensors:
        h.update(t)
    return h


def _planted_outlier():
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    x[123] = 100.0
    return x


def test_minmax_keeps_the_outlier_percentile_clips_it():
    h = _hist(_planted_outlier())
    assert minmax_range(h, QuantSpec())[1] == 100.0
    lo, hi = percentile_range(h, QuantSpec(percentile=99.9))
    assert 2.5 < hi < 4.0 and -4.0 < lo < -2.5  # the 99.9th percentile of N(0,1) is 3.09


def test_streaming_histogram_widens_and_keeps_counts():
    a, b = torch.rand(1000), torch.rand(1000) * 50
    h = _hist(a, b)
    assert h.count == 2000 and h.hist.sum().item() == pytest.approx(2000)
    assert (h.min, h.max) == (min(a.min(), b.min()).item(), max(a.max(), b.max()).item())
    assert h.radius >= h.max


def test_mse_beats_minmax_on_heavy_tailed_data():
    torch.manual_seed(0)
    x = torch.distributions.StudentT(3.0).sample((200_000,))
    spec = QuantSpec(bits=8, symmetric=True)
    h = _hist(x)

    def err(rng):
        qp = qparams_from_range(torch.tensor(rng[0]), torch.tensor(rng[1]), spec)
        return (fake_quantize(x, qp) - x).pow(2).mean().item()

    amax = x.abs().max().item()
    brute_force_best = min(err((-t, t)) for t in torch.linspace(amax / 300, amax, 300).tolist())
    assert err(mse_range(h, spec)) < 0.7 * err(minmax_range(h, spec))
    assert err(mse_range(h, spec)) <= 1.05 * brute_force_best


def test_entropy_clips_a_long_tail():
    h = _hist(_planted_outlier())
    lo, hi = entropy_range(h, QuantSpec(bits=8))
    assert 2.0 < hi < 50.0 and lo > -50.0


def test_non_finite_activation_raises():
    with pytest.raises(NonFiniteError):
        _hist(torch.tensor([1.0, float("nan")]))


def test_all_zero_activation_calibrates_to_a_usable_scale():
    qp = activation_qparams(_hist(torch.zeros(100)), QuantSpec(observer="mse"))
    assert qp.scale.item() > 0 and math.isfinite(qp.scale.item())


def test_mean_minmax_averages_each_samples_extremes_by_hand():
    # three samples (first axis), fed as a batch of 2 then a batch of 1
    batch = torch.tensor([[[0.0, 1.0], [2.0, 3.0]],     # min 0, max 3
                          [[-2.0, 0.0], [5.0, 1.0]],    # min -2, max 5
                          [[-1.0, -1.0], [8.0, 2.0]]])  # min -1, max 8
    h = _hist(batch[:2], batch[2:])
    assert h.samples == 3
    assert mean_minmax_range(h, QuantSpec()) == (-1.0, pytest.approx(16 / 3))
    assert minmax_range(h, QuantSpec()) == (-2.0, 8.0)  # the global extremes stay as they were
    qp = activation_qparams(h, QuantSpec(observer="mean_minmax"))  # asymmetric uint8 over [-1, 16/3]
    assert qp.scale.item() == pytest.approx((16 / 3 + 1) / 255, rel=1e-6)
    assert qp.zero_point.item() == round(1 / ((16 / 3 + 1) / 255))  # 40
    h2 = StreamingHistogram.from_state_dict(h.state_dict())
    assert mean_minmax_range(h2, QuantSpec()) == mean_minmax_range(h, QuantSpec())


def test_mean_minmax_clips_an_extreme_that_one_sample_of_many_reaches():
    x = torch.zeros(100, 16)
    x[:, 0], x[7, 1] = 1.0, 50.0  # every sample reaches 1, one sample 50
    lo, hi = mean_minmax_range(_hist(x), QuantSpec())
    assert (lo, hi) == (0.0, pytest.approx(1.0 + 49 / 100))


def test_mean_minmax_is_for_activations_only():
    with pytest.raises(ValueError, match="activations"):
        weight_qparams(torch.randn(4, 4), QuantSpec(observer="mean_minmax"))


def test_histogram_state_round_trip():
    h = _hist(torch.randn(500))
    h2 = StreamingHistogram.from_state_dict(h.state_dict())
    assert percentile_range(h2, QuantSpec()) == percentile_range(h, QuantSpec())


def test_weight_per_channel_beats_per_tensor_when_rows_differ_in_scale():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    w[0] *= 50
    per_tensor = weight_qparams(w, QuantSpec(symmetric=True))
    per_channel = weight_qparams(w, QuantSpec(symmetric=True, per_channel=True))
    assert per_channel.scale.shape == (8,) and per_tensor.scale.shape == (1,)
    # the ordinary rows no longer pay for row 0's range
    e_t = (fake_quantize(w, per_tensor) - w)[1:].pow(2).sum()
    e_c = (fake_quantize(w, per_channel) - w)[1:].pow(2).sum()
    assert e_c < e_t / 100


def test_weight_entropy_is_rejected_with_a_reason():
    with pytest.raises(ValueError, match="activations"):
        weight_qparams(torch.randn(4, 4), QuantSpec(observer="entropy"))


def test_unknown_observer_named_in_error():
    with pytest.raises(ValueError, match="unknown observer 'maxmin'"):
        activation_qparams(_hist(torch.randn(10)), QuantSpec(observer="maxmin"))
