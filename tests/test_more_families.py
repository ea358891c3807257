"""torchvision's ViT and HF Swin: canonical sites, float-exact instrumentation,
restart at any block, one skip-list for HF ViT and torchvision ViT, and the CLI
(sites, eval, sensitivity, plan) end to end on tiny models."""

import io
import json

import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from transformers import ViTImageProcessor

from quant.calibrate import calibrate
from quant.config import ConfigError, QuantConfig
from quant.families import family_of
from quant.model import QuantModel
from quant.presets import preset
from quant.sites import BLOCK_ROLES
from tests.conftest import TINY_TV, tiny_model, tiny_swin, tiny_torchvision_vit
from vitq.cli import main

LABELS = ["cat", "dog", "fish", "bird", "frog"]


def _names(model):
    return [s.name for s in family_of(model).sites(model)]


# -- torchvision ViT ---------------------------------------------------------------
def test_torchvision_vit_has_hf_vits_canonical_sites():
    tv, hf = tiny_torchvision_vit(), tiny_model("vit")
    tv_sites = family_of(tv).sites(tv)
    assert family_of(tv).name == "torchvision_vit"
    assert _names(tv) == _names(hf)  # same depth: the same 31 canonical names, in the same order
    assert [(s.kind, s.block, s.role) for s in tv_sites] == [(s.kind, s.block, s.role)
                                                             for s in family_of(hf).sites(hf)]
    paths = {s.name: s.path for s in tv_sites}
    assert paths["patch_embed"] == "conv_proj"
    assert paths["blocks.1.attn.q"] == "encoder.layers.encoder_layer_1.self_attention.q_proj"
    assert paths["blocks.1.mlp.fc2"] == "encoder.layers.encoder_layer_1.mlp.3"
    assert paths["norm"] == "encoder.ln" and paths["head"] == "heads.head"


def test_one_skip_list_file_applies_to_hf_vit_and_torchvision_vit(tmp_path):
    path = tmp_path / "skip.yaml"
    QuantConfig(name="skip", float_sites=["blocks.1.mlp.fc2", "blocks.0.attn.*", "*.residual_mlp", "head"],
                overrides={"blocks.1.attn.matmul_av": {"probs": {"observer": "unit"}}}).save(path)
    floats = []
    for model in (tiny_model("vit"), tiny_torchvision_vit()):
        cfg = QuantConfig.load(path)
        sites = family_of(model).sites(model)
        cfg.validate(sites)  # every pattern names a site in both
        floats.append([s.name for s in sites if cfg.is_float(s)])
        av = next(s for s in sites if s.name == "blocks.1.attn.matmul_av")
        assert cfg.slot_specs(av)["probs"].observer == "unit"
    assert floats[0] == floats[1]
    assert "blocks.1.mlp.fc2" in floats[0] and "blocks.0.attn.q" in floats[0]


def test_a_module_path_names_its_canonical_site():
    tv = tiny_torchvision_vit()
    sites = family_of(tv).sites(tv)
    cfg = QuantConfig(float_sites=["encoder.layers.encoder_layer_1.mlp.3", "*.self_attention.q_proj"])
    cfg.validate(sites)
    assert [s.name for s in cfg.int8_sites(sites) if s.kind == "linear" and not cfg.is_float(s)] == [
        "blocks.0.attn.k", "blocks.0.attn.v", "blocks.0.attn.o", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2",
        "blocks.1.attn.k", "blocks.1.attn.v", "blocks.1.attn.o", "blocks.1.mlp.fc1", "head"]
    with pytest.raises(ConfigError, match="close matches: blocks.1.mlp.fc2"):
        QuantConfig(float_sites=["blocks.1.mlp.fc3"]).validate(sites)


def test_torchvision_vit_float_forward_matches_torchvision(pixels):
    model = tiny_torchvision_vit()
    with torch.no_grad():
        reference = model(pixels)  # torchvision's own forward, fused nn.MultiheadAttention
    qm = QuantModel(model)
    assert type(model.encoder.layers[0].self_attention).__name__ == "SplitAttention"
    assert torch.allclose(qm(pixels), reference, atol=1e-5)
    assert qm.head_dim == TINY_TV["hidden_dim"] // TINY_TV["num_heads"]
    assert qm.family.num_tokens(model) == qm.embed(pixels).shape[1] == 17


def test_torchvision_split_attention_keeps_the_fused_weights():
    model = tiny_torchvision_vit()
    fused = model.encoder.layers[1].self_attention.in_proj_weight.detach().clone()
    family_of(model)
    at = model.encoder.layers[1].self_attention
    assert torch.equal(torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight]), fused)
    family_of(model)  # idempotent
    assert model.encoder.layers[1].self_attention is at


# -- Swin --------------------------------------------------------------------------
def test_swin_sites():
    model = tiny_swin()
    sites = family_of(model).sites(model)
    names = [s.name for s in sites]
    assert names[:3] == ["patch_embed", "patch_embed.norm", "stages.0.blocks.0.norm1"]
    assert names[-2:] == ["norm", "head"]
    assert len(sites) == 2 + 4 * 14 + 2 + 2
    for g, (stage, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        block = [s for s in sites if s.block == g and s.role in BLOCK_ROLES]
        assert [s.role for s in block] == list(BLOCK_ROLES)
        assert all(s.name.startswith(f"stages.{stage}.blocks.{j}.") for s in block)
    merge = {s.name: s for s in sites if s.role.startswith("downsample")}
    assert list(merge) == ["stages.0.downsample.norm", "stages.0.downsample"]
    assert merge["stages.0.downsample"].kind == "linear" and merge["stages.0.downsample"].block == 1
    assert merge["stages.0.downsample"].path == "swin.encoder.layers.0.downsample.reduction"
    assert "stages.1.blocks.0.attn.matmul_qk" in names and "stages.0.blocks.1.attn.softmax" in names


@pytest.mark.parametrize("overrides", [{}, {"window_size": 3}, {"window_size": 4}],
                         ids=["shifted-windows", "padded-windows", "window-covers-stage-1"])
def test_swin_float_forward_matches_transformers(overrides, pixels):
    model = tiny_swin(**overrides)
    with torch.no_grad():
        reference = model(pixels).logits
    qm = QuantModel(model)
    assert torch.allclose(qm(pixels), reference, atol=1e-5)


def test_swin_every_slot_once_and_restart_at_any_block(pixels):
    qm = QuantModel(tiny_swin())
    calls = {tq.name: 0 for tq in qm.tensor_quantizers()}
    for tq in qm.tensor_quantizers():
        tq.taps.append(lambda tq, x, out: calls.__setitem__(tq.name, calls[tq.name] + 1))
    full = qm(pixels)
    assert set(calls.values()) == {1}, {n: c for n, c in calls.items() if c != 1}
    with torch.inference_mode():
        h = qm.embed(pixels)
        shapes = []
        for k in range(qm.num_blocks):
            shapes.append(tuple(h.shape[1:]))
            assert torch.equal(qm.head(qm.run_blocks(h, k)), full)  # restart at block k
            h = qm.run_blocks(h, k, k + 1)
    assert shapes == [(64, 16), (64, 16), (16, 32), (16, 32)]  # the patch merging ends block 1


def test_swin_quantizes_presets_and_smoothing(pixels):
    qm = QuantModel(tiny_swin())
    calibrate(qm, [pixels], progress=False)
    with torch.inference_mode():
        reference = qm(pixels)
    consumers = qm.family.norm_consumers(qm.model, qm.sites)
    assert consumers["stages.0.downsample.norm"] == ["stages.0.downsample"]
    assert consumers["stages.1.blocks.1.norm1"] == [f"stages.1.blocks.1.attn.{r}" for r in "qkv"]
    for name in ("all", "mixed_1", "mixed_2"):
        cfg = preset(name, qm.sites)
        qm.apply(cfg)
        out = qm(pixels)
        assert not torch.equal(out, reference)
        assert torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0) > 0.9
    mixed_2 = preset("mixed_2", qm.sites)  # 4 blocks: fc2 of the last two (no blocks 4 and 5)
    assert mixed_2.float_sites == ["*.residual_*", "stages.1.blocks.0.mlp.fc2", "stages.1.blocks.1.mlp.fc2"]
    assert sum(s.kind == "residual" and mixed_2.is_float(s) for s in qm.sites) == 8
    qm.apply(QuantConfig(smooth={"*.norm1": 0.5, "stages.0.downsample.norm": 0.5}))
    assert torch.nn.functional.cosine_similarity(qm(pixels).flatten(), reference.flatten(), dim=0) > 0.9


# -- the command line on tiny models -------------------------------------------------
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for split, n in (("train", 4), ("val", 3)):
        for c, label in enumerate(LABELS[:4]):
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 36), color=(40 * c, 20 * i, 90)).save(root / split / label / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def torchvision_weights(tmp_path_factory):
    """A tiny torchvision ViT checkpoint as vitq reads one: its VisionTransformer
    arguments, labels and state dict."""
    path = tmp_path_factory.mktemp("tv") / "tiny_vit.pth"
    model = tiny_torchvision_vit()
    torch.save({"config": TINY_TV, "labels": LABELS, "state_dict": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def swin_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-swin")
    model = tiny_swin(id2label=dict(enumerate(LABELS)), label2id={l: i for i, l in enumerate(LABELS)})
    model.config.architectures = ["SwinForImageClassification"]
    model.save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _model_args(kind, torchvision_weights=None, swin_dir=None):
    if kind == "torchvision":
        return ["--model", "torchvision:vit_b_16", "--weights", str(torchvision_weights)]
    return ["--model", str(swin_dir)]


@pytest.fixture(params=["torchvision", "swin"])
def model_args(request):
    if request.param == "torchvision":
        return request.param, _model_args("torchvision", torchvision_weights=request.getfixturevalue(
            "torchvision_weights"))
    return request.param, _model_args("swin", swin_dir=request.getfixturevalue("swin_dir"))


def test_cli_sites_prints_canonical_names_and_paths(model_args, capsys):
    kind, args = model_args
    assert main(["sites", *args, "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "name,kind,block,role,tensors,path"
    if kind == "torchvision":
        assert "blocks.1.mlp.fc2,linear,1,fc2,input+weight,encoder.layers.encoder_layer_1.mlp.3" in lines
    else:
        assert ("stages.0.downsample,linear,1,downsample,input+weight,swin.encoder.layers.0.downsample.reduction"
                in lines)
    assert main(["sites", *args]) == 0
    assert "Configs take the canonical name or the path" in capsys.readouterr().out


def test_cli_eval_sensitivity_plan(model_args, data_dir, tmp_path, capsys):
    kind, args = model_args
    out = tmp_path / "out"
    common = [*args, "--data", str(data_dir), "--calib", "8", "--out", str(out), "--no-progress"]
    assert main(["sites", *args, "--format", "csv"]) == 0  # the sites, from another command
    sites = pd.read_csv(io.StringIO(capsys.readouterr().out))
    int8 = sites[~sites["kind"].isin(["layernorm", "gelu", "softmax"])]  # what `all` quantizes
    residual = (int8["kind"] == "residual").sum()
    assert main(["eval", *common, "--batch-size", "5"]) == 0
    df = pd.read_csv(out / "eval.csv")
    assert df["config"].tolist() == ["fp32", "all", "mixed_1", "mixed_2"] and (df["images"] == 12).all()
    # all: every site but the backend-float kinds; mixed_1: also the residual adds float;
    # mixed_2: also fc2 of two blocks
    assert df["int8_sites"].tolist() == [0, len(int8), len(int8) - residual, len(int8) - residual - 2]
    assert main(["sensitivity", *common, "--eval-images", "8", "--batch-size", "4"]) == 0
    sens = pd.read_csv(out / "sensitivity_only_op.csv").set_index("candidate")
    assert sorted(sens.index) == sorted(int8["name"])  # one candidate per int8 site, canonical names
    # each candidate restarts at its own block: -1 = the patch embedding, the head after the last block
    starts = {"patch_embed": -1, "head": 2, "blocks.1.mlp.fc2": 1, "blocks.0.residual_attn": 0}
    if kind == "swin":  # 4 blocks in 2 stages; stage 0's patch merging runs with its last block
        starts = {"patch_embed": -1, "head": 4, "stages.0.downsample": 1, "stages.1.blocks.0.attn.q": 2,
                  "stages.1.blocks.1.mlp.fc2": 3}
    assert sens.loc[list(starts), "start_block"].to_dict() == starts
    assert main(["plan", *common, "--eval-images", "6", "--max-kl", "0", "--max-steps", "2", "--batch-size", "3",
                 "--cost", "macs"]) == 0
    printed = capsys.readouterr().out
    # KL <= 0 cannot hold: never "met"; on 6 images its one-sided bound may leave it undecided
    assert ("NOT met" in printed or "UNDECIDED" in printed) and "met with 95 % confidence" not in printed
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    assert all(not s.startswith(("vit.", "swin.", "encoder.")) for s in plan["float_sites"])  # canonical
    meta = json.loads((out / "eval.json").read_text())["meta"]
    assert meta["family"] == ("torchvision_vit" if kind == "torchvision" else "swin")


def test_torchvision_model_needs_a_weights_file(capsys):
    pytest.importorskip("torchvision", reason="torchvision is not installed (CI's CPU torch has none)")
    assert main(["sites", "--model", "torchvision:vit_b_16"]) == 2
    err = capsys.readouterr().err
    assert "--weights PATH" in err and "vit_b_16-c867db91.pth" in err
    assert main(["sites", "--model", "torchvision:resnet50", "--weights", "x.pth"]) == 2
    assert "unknown torchvision model 'resnet50'" in capsys.readouterr().err


def test_a_weights_file_that_does_not_fit_is_one_error_line(tmp_path, capsys):
    path = tmp_path / "tiny_plain.pth"
    torch.save(tiny_torchvision_vit().state_dict(), path)  # a plain state dict of another size
    assert main(["sites", "--model", "torchvision:vit_b_32", "--weights", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit vit_b_32" in err[0]
    assert main(["sites", "--weights", str(path)]) == 2  # --weights with a HF model
    assert "--weights is for torchvision and timm models" in capsys.readouterr().err
