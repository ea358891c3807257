"""timm's ViT, DeiT and Swin (quant/families/timm_vit.py, timm_swin.py): HF's canonical
site names, timm's float forward, loading ``--model timm:ARCH --weights FILE``, and
``vitq analyze`` end to end on a tiny timm ViT. (tests/test_families.py runs the registry's
generic checks over both families too.)"""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest
import torch
import yaml

pytest.importorskip("timm", reason="timm is not installed (it needs the torchvision matching torch; "
                                   "`pip install timm`)")

from quant.calibrate import calibrate  # noqa: E402
from quant.config import QuantConfig  # noqa: E402
from quant.families import REGISTRY, family_of  # noqa: E402
from quant.families.timm_vit import TINY as TINY_TIMM  # noqa: E402
from quant.model import QuantModel  # noqa: E402
from quant.presets import preset  # noqa: E402
from vitq.cli import main  # noqa: E402
from vitq.models import DEFAULT_DATA, DEFAULT_MODEL  # noqa: E402

from conftest import tiny_model  # noqa: E402

LABELS = [v for _, v in sorted(json.loads((DEFAULT_MODEL / "config.json").read_text())["id2label"].items(),
                               key=lambda kv: int(kv[0]))]


def timm_tiny(family: str, **kw):
    return REGISTRY[family].tiny(0, **kw)


def _sites(model):
    return [(s.name, s.kind, s.block, s.role) for s in family_of(model).sites(model)]


@pytest.mark.parametrize("timm_model,hf_model", [
    (lambda: timm_tiny("timm_vit"), lambda: tiny_model("vit")),
    (lambda: timm_tiny("timm_vit", arch="deit_tiny_patch16_224"), lambda: tiny_model("deit", teacher=False)),
    (lambda: timm_tiny("timm_vit", arch="deit_tiny_distilled_patch16_224"), lambda: tiny_model("deit")),
    (lambda: timm_tiny("timm_swin"), lambda: tiny_model("swin")),
], ids=["vit", "deit", "deit_distilled", "swin"])
def test_timm_lists_the_canonical_sites_of_its_hf_counterpart(timm_model, hf_model):
    timm_sites, hf_sites = _sites(timm_model()), _sites(hf_model())
    assert timm_sites == hf_sites and len(timm_sites) > 30  # names, kinds, blocks and roles, in order


def test_timm_paths_are_timms_modules():
    vit, swin = timm_tiny("timm_vit"), timm_tiny("timm_swin")
    paths = {s.name: s.path for s in family_of(vit).sites(vit)}
    assert paths["patch_embed"] == "patch_embed.proj" and paths["blocks.1.attn.o"] == "blocks.1.attn.proj"
    assert paths["blocks.0.attn.k"] == "blocks.0.attn.k" and paths["blocks.0.mlp.gelu"] == "blocks.0.mlp.gelu"
    paths = {s.name: s.path for s in family_of(swin).sites(swin)}
    # HF's stage 0 ends with the patch merging that timm runs at the start of stage 1
    assert paths["stages.0.downsample"] == "layers.1.downsample.reduction"
    assert paths["stages.0.downsample.norm"] == "layers.1.downsample.norm"
    assert paths["head"] == "head.fc" and paths["stages.1.blocks.1.attn.q"] == "layers.1.blocks.1.attn.q"


@pytest.mark.parametrize("family,kw", [
    ("timm_vit", {}), ("timm_vit", {"arch": "deit_tiny_distilled_patch16_224"}),
    ("timm_vit", {"init_values": 0.3}),  # layer scale before the residual adds
    ("timm_vit", {"class_token": True, "reg_tokens": 2}),
    ("timm_swin", {}), ("timm_swin", {"window_size": 4}),
    ("timm_swin", {"img_size": 28, "window_size": 3}),  # padded windows
], ids=["vit", "deit_distilled", "layer_scale", "registers", "swin", "swin_w4", "swin_padded"])
def test_instrumented_float_forward_equals_timms(family, kw):
    model = timm_tiny(family, **kw)
    size = model.patch_embed.img_size
    x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(x)  # timm's own forward, before restructuring
    qm = QuantModel(model)
    with torch.no_grad():
        assert torch.allclose(qm(x), reference, atol=1e-5)
        assert torch.allclose(model(x), reference, atol=1e-5)  # restructured, uninstrumented: still timm's maths
    calibrate(qm, [x], progress=False)
    qm.apply(preset("all", qm.sites))
    with torch.no_grad():
        quantized = qm(x)
    assert not torch.allclose(quantized, reference, atol=1e-5)  # the int8 sites act
    assert torch.isfinite(quantized).all()


def test_split_qkv_keeps_timms_fused_weights():
    model = timm_tiny("timm_vit")
    fused = model.blocks[0].attn.qkv.weight.detach().clone()
    family_of(model)
    attn = model.blocks[0].attn
    assert not hasattr(attn, "qkv")
    assert torch.equal(torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]), fused)


def test_variants_without_sites_are_refused():
    from quant.families import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="q/k norms"):
        family_of(timm_tiny("timm_vit", qk_norm=True))
    with pytest.raises(UnsupportedModelError, match="fc_norm"):
        family_of(timm_tiny("timm_vit", global_pool="avg"))


# -- loading and the command line ----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A tiny timm ViT checkpoint as vitq reads one: create_model arguments, labels (the
    embedded data's classes) and state dict."""
    path = tmp_path_factory.mktemp("timm") / "tiny_vit.pth"
    config = {**TINY_TIMM, "num_classes": len(LABELS)}
    model = timm_tiny("timm_vit", num_classes=len(LABELS))
    torch.save({"config": config, "labels": LABELS, "state_dict": model.state_dict()}, path)
    return path


def test_a_plain_timm_state_dict_loads_with_imagenet_synsets(tmp_path, capsys):
    import timm
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"  # as `hf download timm/vit_tiny_patch16_224` gives it
    save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), path)
    assert main(["sites", "--model", "timm:vit_tiny_patch16_224", "--weights", str(path), "--format", "csv"]) == 0
    sites = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert len(sites) == 1 + 12 * 14 + 2 and sites["name"].iloc[-1] == "head"
    from vitq.models import load_model
    loaded = load_model("timm:vit_tiny_patch16_224", path)
    assert loaded.model.config.id2label[0] == "n01440764" and len(loaded.model.config.id2label) == 1000
    from PIL import Image
    assert loaded.processor(images=Image.new("RGB", (300, 260)))["pixel_values"].shape == (1, 3, 224, 224)
    assert loaded.name == "vit_tiny_patch16_224-model"


def test_loading_errors_are_one_line(tmp_path, capsys, tiny_weights):
    assert main(["sites", "--model", "timm:vit_tiny_patch16_224"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--weights PATH" in err[0] and "hf download timm/vit_tiny_patch16_224" in err[0]
    assert main(["sites", "--model", "timm:no_such_net", "--weights", str(tiny_weights)]) == 2
    assert "timm has no model 'no_such_net'" in capsys.readouterr().err
    assert main(["sites", "--model", "timm:vit_small_patch16_224", "--weights", str(tiny_weights)]) == 0
    capsys.readouterr()  # the checkpoint's config builds the tiny model whatever the name's size
    plain = tmp_path / "plain.pth"
    torch.save(timm_tiny("timm_vit").state_dict(), plain)
    assert main(["sites", "--model", "timm:vit_small_patch16_224", "--weights", str(plain)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit vit_small_patch16_224" in err[0]
    unsupported = tmp_path / "qknorm.pth"
    model = timm_tiny("timm_vit", qk_norm=True)
    torch.save({"config": {**TINY_TIMM, "qk_norm": True}, "labels": [str(i) for i in range(5)],
                "state_dict": model.state_dict()}, unsupported)
    assert main(["sites", "--model", "timm:vit_tiny_patch16_224", "--weights", str(unsupported)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "q/k norms" in err[0] and "not supported" in err[0]


def test_vitq_analyze_runs_end_to_end_on_a_tiny_timm_vit(tmp_path, tiny_weights, capsys):
    out = tmp_path / "out"
    assert main(["analyze", "--model", "timm:vit_tiny_patch16_224", "--weights", str(tiny_weights),
                 "--data", str(DEFAULT_DATA), "--calib", "16", "--eval-images", "16", "--confirm-images", "16",
                 "--limit", "40", "--error-images", "8", "--cost", "macs", "--measure-top", "4",
                 "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    acc = pd.read_csv(out / "accuracy.csv")
    assert acc["config"].tolist()[0] == "fp32" and "plan" in acc["config"].tolist()
    assert (acc["images"] == 40).all()
    meta = json.loads((out / "accuracy.json").read_text())["meta"]
    assert meta["family"] == "timm_vit" and meta["model"].startswith("timm:vit_tiny_patch16_224@")
    plan = QuantConfig.load(out / "plan.yaml")
    assert all(s.startswith(("blocks.", "patch_embed", "norm", "head")) for s in plan.float_sites)  # canonical
    assert yaml.safe_load((out / "plan_skiplist.yaml").read_text())["float_sites"] is not None
    sens = pd.read_csv(out / "sensitivity_only_op.csv")  # the taylor estimate's top 4, measured
    assert len(sens) == 4 and sens["candidate"].str.match(r"^(blocks\.[01]\.|patch_embed$|head$)").all()
    assert (out / "report.html").is_file()


def test_an_in_memory_timm_model_through_the_python_api(tmp_path):
    import vitq
    from quant.families.timm_common import processor

    model = timm_tiny("timm_vit", num_classes=len(LABELS))
    assert vitq.sites(model)["name"].tolist() == [s[0] for s in _sites(tiny_model("vit"))]
    with pytest.raises(ValueError, match="labels="):  # a timm model has no id2label
        vitq.evaluate(model, processor=processor(model), out=tmp_path)
    result = vitq.evaluate(model, processor=processor(model), labels=LABELS, out=tmp_path, presets=("all",),
                           limit=16, calib=8, progress=False, device="cpu")
    assert result.table["config"].tolist() == ["fp32", "all"] and (result.table["images"] == 16).all()
    assert result.meta["family"] == "timm_vit" and result.meta["model"].startswith("memory:VisionTransformer@")
    assert not hasattr(model, "config")  # the labels went to vitq's copy


def test_one_skip_list_applies_to_hf_and_timm_alike():
    hf, tm = tiny_model("vit"), timm_tiny("timm_vit")
    cfg = QuantConfig(name="skip", float_sites=["blocks.1.mlp.fc2", "*.residual_*", "blocks.0.attn.matmul_av"])
    int8 = []
    for model in (hf, tm):
        sites = family_of(model).sites(model)
        cfg.validate(sites)
        int8.append([s.name for s in cfg.int8_sites(sites)])
    assert int8[0] == int8[1] and "blocks.1.mlp.fc2" not in int8[1] and "blocks.1.mlp.fc1" in int8[1]


def test_vitq_eval_on_a_tiny_timm_swin(tmp_path, capsys):
    path = tmp_path / "tiny_swin.pth"
    from quant.families.timm_swin import TINY as TINY_SWIN

    model = timm_tiny("timm_swin", num_classes=len(LABELS))
    torch.save({"config": {**TINY_SWIN, "num_classes": len(LABELS)}, "labels": LABELS,
                "state_dict": model.state_dict()}, path)
    out = tmp_path / "out"
    assert main(["eval", "--model", "timm:swin_tiny_patch4_window7_224", "--weights", str(path), "--calib", "8",
                 "--limit", "16", "--preset", "all,mixed_1", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    df = pd.read_csv(out / "eval.csv")
    assert df["config"].tolist() == ["fp32", "all", "mixed_1"] and (df["images"] == 16).all()
    # mixed_1 keeps the residual adds of the 4 blocks (2 stages of 2) float, all quantizes them
    assert df["int8_sites"].iloc[1] - df["int8_sites"].iloc[2] == 8
    assert json.loads((out / "eval.json").read_text())["meta"]["family"] == "timm_swin"
