import pytest
import torch

from quant.quantizer import MIN_SCALE, QuantSpec, fake_quantize, qparams_from_range, quantize_to_int


def test_asymmetric_uint8_scale_and_zero_point_by_hand():
    # range [-1, 3]: scale = 4/255, zero point = 0 - round(-1 / (4/255)) = round(63.75) = 64
    qp = qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0), QuantSpec(bits=8, symmetric=False))
    assert qp.scale.item() == pytest.approx(4 / 255)
    assert qp.zero_point.item() == 64
    assert (qp.qmin, qp.qmax) == (0, 255)


def test_symmetric_int8_maps_amax_to_127():
    qp = qparams_from_range(torch.tensor(-2.0), torch.tensor(1.0), QuantSpec(bits=8, symmetric=True))
    assert qp.scale.item() == pytest.approx(2 / 127)
    assert qp.zero_point.item() == 0
    codes = quantize_to_int(torch.tensor([-2.0, 1.0, 5.0, -9.0]), qp)
    assert codes.tolist() == [-127, 64, 127, -128]  # 1/(2/127)=63.5 rounds half to even -> 64; clamps


def test_range_is_widened_to_contain_zero():
    qp = qparams_from_range(torch.tensor(2.0), torch.tensor(4.0), QuantSpec(bits=8))
    assert qp.zero_point.item() == 0 and qp.scale.item() == pytest.approx(4 / 255)


def test_round_half_to_even_and_clamp():
    qp = qparams_from_range(torch.tensor(0.0), torch.tensor(255.0), QuantSpec(bits=8))  # scale 1, zp 0
    x = torch.tensor([0.5, 1.5, 2.5, -3.0, 300.0])
    assert fake_quantize(x, qp).tolist() == [0.0, 2.0, 2.0, 0.0, 255.0]


def test_fake_quant_equals_torch_int8_kernel():
    x = torch.randn(1000) * 3
    qp = qparams_from_range(x.min(), x.max(), QuantSpec(bits=8))
    ref = torch.quantize_per_tensor(x, qp.scale.item(), int(qp.zero_point.item()), torch.quint8).dequantize()
    assert torch.equal(fake_quantize(x, qp), ref)


def test_per_channel_uses_each_rows_range():
    w = torch.tensor([[1.0, -0.5], [10.0, 2.0]])
    qp = qparams_from_range(w.amin(1), w.amax(1), QuantSpec(symmetric=True, per_channel=True), ch_axis=0)
    assert qp.scale.tolist() == pytest.approx([1 / 127, 10 / 127])
    ref = torch.quantize_per_channel(w, qp.scale.double(), qp.zero_point.long(), 0, torch.qint8).dequantize()
    assert torch.equal(fake_quantize(w, qp), ref)


def test_all_zero_tensor_gives_positive_finite_scale():
    qp = qparams_from_range(torch.tensor(0.0), torch.tensor(0.0), QuantSpec())
    assert qp.scale.item() == MIN_SCALE
    assert torch.equal(fake_quantize(torch.zeros(5), qp), torch.zeros(5))


@pytest.mark.parametrize("bits", [1, 17, 8.0])
def test_bits_outside_2_to_16_rejected(bits):
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=bits)


def test_non_finite_range_rejected():
    with pytest.raises(ValueError, match="non-finite"):
        qparams_from_range(torch.tensor(float("nan")), torch.tensor(1.0), QuantSpec())


def test_composed_per_tensor_fake_quant_is_bit_identical():
    import quant.quantizer as qz
    from quant.quantizer import QuantSpec, fake_quantize, qparams_from_range

    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 257, 384, generator=g) * 3
    x[0, 0, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 1e6, -1e6, 0.0])  # ties, clipping
    for spec, lo, hi in ((QuantSpec(), -2.0, 5.0), (QuantSpec(symmetric=True), -3.0, 3.0),
                         (QuantSpec(bits=4), 0.0, 1.0), (QuantSpec(), 0.0, 0.0)):
        qp = qparams_from_range(torch.tensor(lo), torch.tensor(hi), spec)
        with torch.inference_mode():
            fast = fake_quantize(x, qp)
        ref = torch.fake_quantize_per_tensor_affine(x, qp.scale, qp.zero_point, qp.qmin, qp.qmax)
        assert torch.equal(fast, ref)
    assert qz.FAST_PER_TENSOR


def test_fake_quant_gradient_is_straight_through_inside_the_grid_and_zero_outside():
    """With autograd on, the per-tensor fake quant passes the gradient (1) for values the
    grid covers and blocks it (0) for clipped ones. Range [-2, 5], uint8: scale 7/255,
    zero point 0 - round(-2 / scale) = 73, so the grid covers [-73 s, 182 s] = [-2.004, 4.996]."""
    from quant.quantizer import QuantSpec, fake_quantize, qparams_from_range

    qp = qparams_from_range(torch.tensor(-2.0), torch.tensor(5.0), QuantSpec())
    assert int(qp.zero_point) == 73 and float(qp.scale) == pytest.approx(7 / 255)
    x = torch.tensor([0.5, -1.9, 4.9, 0.0, 5.1, -2.1, 1e6, -1e6], requires_grad=True)
    y = fake_quantize(x, qp)
    (y * torch.arange(1.0, 9.0)).sum().backward()  # distinct upstream gradients: each must pass unchanged
    assert x.grad.tolist() == [1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0]
    assert y[4].item() == pytest.approx(182 * 7 / 255) and y[5].item() == pytest.approx(-73 * 7 / 255)  # clipped
