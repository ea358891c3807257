"""--device: auto/cpu/cuda resolution, the one-line error without CUDA, and every
quantizer tensor following the model's device (checked on CPU: CI has no GPU)."""

import pandas as pd
import pytest
import torch

from quant.model import QuantModel
from quant.presets import preset
from analysis.runner import Runner
from tests.conftest import tiny_model
from tests.test_cli import data_dir, model_dir  # noqa: F401  (module fixtures)
from vitq.cli import main
from vitq.session import DeviceError, resolve_device


def test_auto_is_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_cuda_without_cuda_is_a_user_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="unsupported device"):
        resolve_device("mps")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("gpu0")


def test_tf32_is_off_unless_asked():
    resolve_device("cpu", tf32=True)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    resolve_device("cpu")
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


def test_cli_cuda_without_cuda_one_line_error(model_dir, data_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for cmd in (["sites"], ["eval", "--data", str(data_dir), "--out", str(tmp_path)]):
        assert main([*cmd, "--model", str(model_dir), "--device", "cuda", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("vitq: error: --device cuda: CUDA is not available")


def test_device_cpu_equals_default(model_dir, data_dir, tmp_path, capsys):  # noqa: F811
    common = ["--model", str(model_dir), "--data", str(data_dir), "--calib", "8", "--batch-size", "5",
              "--no-progress", "--preset", "all,mixed_1"]
    assert main(["eval", *common, "--out", str(tmp_path / "a")]) == 0
    assert main(["eval", *common, "--out", str(tmp_path / "b"), "--device", "cpu"]) == 0
    a, b = pd.read_csv(tmp_path / "a" / "eval.csv"), pd.read_csv(tmp_path / "b" / "eval.csv")
    pd.testing.assert_frame_equal(a, b)


def off_device(qmodel: QuantModel) -> list[str]:
    """Names of quantizer tensors (scales, zero points, weight caches) not on the model's device."""
    dev, bad = qmodel.device, []
    for tq in qmodel.tensor_quantizers():
        tensors = [tq._weight_cache] + ([tq.qparams.scale, tq.qparams.zero_point] if tq.qparams else [])
        bad += [tq.name for t in tensors if t is not None and t.device != dev]
    return bad


def test_quantizer_tensors_follow_the_model(pixels):
    qmodel = QuantModel(tiny_model("vit"))
    from quant.calibrate import calibrate
    calibrate(qmodel, [pixels], progress=False)
    config = preset("all", qmodel.sites)
    qmodel.apply(config)
    assert off_device(qmodel) == []
    # activation qparams come from CPU histograms: quantize() moves them once, not per forward
    acts = [tq for tq in qmodel.tensor_quantizers() if tq.qparams is not None and not tq.is_weight]
    assert acts and all(tq.qparams.scale.device == qmodel.device for tq in acts)
    runner = Runner(qmodel, [pixels[:2], pixels[2:]])
    assert runner.reference.device == torch.device("cpu")  # metrics are gathered on the host
    qmodel.to("cpu")  # moving resets the state to float and re-reads the (moved) weights
    assert all(tq.mode == "float" for tq in qmodel.tensor_quantizers())
    qmodel.apply(config)
    assert off_device(qmodel) == []
