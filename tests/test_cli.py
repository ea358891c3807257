"""`vitq` end to end on a tiny model folder and a generated image folder."""

import json
import subprocess
import sys

import pandas as pd
import pytest
from PIL import Image
from transformers import ViTImageProcessor

from quant.model import QuantModel
from tests.conftest import tiny_model
from vitq.cli import main
from vitq.models import load_model

LABELS = ["cat", "dog", "fish", "bird", "frog"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-vit")
    model = tiny_model("vit", id2label=dict(enumerate(LABELS)), label2id={l: i for i, l in enumerate(LABELS)})
    model.config.architectures = ["ViTForImageClassification"]
    model.save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for split, n in (("train", 4), ("val", 3)):
        for c, label in enumerate(LABELS[:4]):  # val covers only 4 of the 5 classes
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 36), color=(40 * c, 20 * i, 90)).save(root / split / label / f"{i}.png")
    return root


def test_sites_lists_every_site(model_dir, capsys):
    assert main(["sites", "--model", str(model_dir), "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "name,kind,block,role,tensors,path"
    assert len(lines) - 1 == 31
    assert "blocks.1.mlp.fc2,linear,1,fc2,input+weight,vit.layers.1.mlp.fc2" in lines


def _val_pixels_and_labels(model_dir, val_dir):
    """The files of ``val_dir`` through the model folder's own processor, with their labels
    from the class folder names through the model's label2id (no vitq code)."""
    import torch
    from transformers import AutoConfig, AutoImageProcessor

    label2id = AutoConfig.from_pretrained(model_dir).label2id
    files = sorted(val_dir.glob("*/*.png"))
    processor = AutoImageProcessor.from_pretrained(model_dir)
    pixels = processor(images=[Image.open(f).convert("RGB") for f in files], return_tensors="pt")["pixel_values"]
    return pixels, torch.tensor([label2id[f.parent.name] for f in files])


@pytest.fixture(scope="module")
def separating_model_dir(model_dir, data_dir, tmp_path_factory):
    """The tiny model with a classifier fitted (least squares) to tell the val images' classes
    apart: a random tiny ViT gives every image the same class, so top-1 would not show a
    wrong label mapping or a wrong preprocessing."""
    import torch
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    pixels, labels = _val_pixels_and_labels(model_dir, data_dir / "val")
    features = []
    hook = model.classifier.register_forward_hook(lambda m, inp, out: features.append(inp[0]))
    with torch.no_grad():
        model(pixel_values=pixels)
    hook.remove()
    h = torch.cat([features[0].double(), torch.ones(len(labels), 1, dtype=torch.float64)], 1)
    target = 4.0 * torch.nn.functional.one_hot(labels, model.config.num_labels).double()
    w = torch.linalg.lstsq(h, target).solution
    with torch.no_grad():
        model.classifier.weight.copy_(w[:-1].T)
        model.classifier.bias.copy_(w[-1])
    path = tmp_path_factory.mktemp("tiny-vit-separating")
    model.save_pretrained(path)
    ViTImageProcessor.from_pretrained(model_dir).save_pretrained(path)
    return path


def _plain_hf_topk(model_dir, val_dir):
    """Top-1 and top-5 (%) of the uninstrumented transformers model on every image of ``val_dir``."""
    import torch
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    pixels, labels = _val_pixels_and_labels(model_dir, val_dir)
    with torch.no_grad():
        ranked = model(pixel_values=pixels).logits.topk(5, dim=1).indices
    return (100 * (ranked[:, 0] == labels).float().mean().item(),
            100 * (ranked == labels[:, None]).any(1).float().mean().item())


def test_eval_writes_table_csv_json_and_configs(separating_model_dir, data_dir, tmp_path, capsys):
    model_dir = separating_model_dir
    out = tmp_path / "out"
    rc = main(["eval", "--model", str(model_dir), "--data", str(data_dir), "--calib", "8", "--out", str(out),
               "--batch-size", "5", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "top-1 %" in printed and "mixed_2" in printed
    df = pd.read_csv(out / "eval.csv")
    assert df["config"].tolist() == ["fp32", "all", "mixed_1", "mixed_2"]
    assert (df["images"] == 12).all()
    # the FP32 row against the plain transformers model run on the same files through its processor
    top1, top5 = _plain_hf_topk(model_dir, data_dir / "val")
    assert top1 >= 50  # the fitted classifier tells the classes apart, so a wrong mapping would show
    assert df.loc[0, "top1"] == pytest.approx(top1) and df.loc[0, "top5"] == pytest.approx(top5)
    assert df["top1_drop"].tolist() == pytest.approx([top1 - t for t in df["top1"]])
    assert df["int8_sites"].tolist()[1:] == [31 - 9, 31 - 9 - 4, 31 - 9 - 4 - 2]  # 9 = 2 x (2 LN + GELU + softmax) + final LN
    meta = json.loads((out / "eval.json").read_text())
    assert meta["meta"]["calibration_images"] == 8 and len(meta["rows"]) == 4
    assert (out / "config_mixed_2.yaml").is_file() and (out / "calibration.pt").is_file()


def test_eval_is_deterministic_and_reuses_calibration(model_dir, data_dir, tmp_path):
    args = ["eval", "--model", str(model_dir), "--data", str(data_dir), "--calib", "8", "--no-progress",
            "--preset", "all"]
    main(args + ["--out", str(tmp_path / "a")])
    main(args + ["--out", str(tmp_path / "a")])  # second run: cached calibration
    main(args + ["--out", str(tmp_path / "b")])
    assert (tmp_path / "a" / "eval.csv").read_bytes() == (tmp_path / "b" / "eval.csv").read_bytes()


def test_custom_config_file_is_evaluated(model_dir, data_dir, tmp_path):
    cfg = tmp_path / "plan.yaml"
    cfg.write_text("name: plan\nactivation: {observer: percentile, percentile: 99.9}\nfloat_sites: ['*.fc2']\n")
    main(["eval", "--model", str(model_dir), "--data", str(data_dir), "--calib", "8", "--no-progress",
          "--preset", "fp32", "--config", str(cfg), "--out", str(tmp_path / "o")])
    df = pd.read_csv(tmp_path / "o" / "eval.csv")
    assert df["config"].tolist() == ["fp32", "plan"] and df.loc[1, "int8_sites"] == 31 - 9 - 2


@pytest.mark.parametrize("argv,message", [
    (["eval", "--data", "/nonexistent/folder"], "--data /nonexistent/folder: no such folder"),
    (["eval", "--preset", "all,int4"], "unknown preset 'int4'"),
    (["sites", "--model", "/nonexistent/model"], "no such folder"),
    (["sites", "--model", "some-org/some-model-that-is-not-cached"], "cannot be reached"),
])
def test_user_errors_are_one_line_without_traceback(argv, message, capsys, monkeypatch, model_dir, data_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = [a for a in argv]
    if argv[0] == "eval" and "--model" not in argv:
        argv += ["--model", str(model_dir)]
        if "--data" not in argv:
            argv += ["--data", str(data_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitq: error: ") and message in err and "Traceback" not in err


def test_console_script_runs_as_a_subprocess(model_dir):
    result = subprocess.run([sys.executable, "-m", "vitq", "sites", "--model", str(model_dir)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "31 sites in 2 blocks" in result.stdout


def test_help_builds_the_parser_without_the_heavy_modules():
    """`vitq --help` answers in a fraction of a second: the parser needs no torch,
    transformers, pandas or matplotlib (main() imports them after parsing)."""
    code = ("import sys, runpy; sys.argv = ['vitq', 'sensitivity', '--help']\n"
            "try:\n    runpy.run_module('vitq', run_name='__main__')\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "light = {'quant', 'quant.names', 'analysis', 'analysis.names'}\n"
            "heavy = {m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'pandas', 'matplotlib',"
            " 'quant', 'analysis', 'reports')} - light\n"
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--rank-by {kl,top1_drop,agreement,logit_sqnr_db}" in result.stdout


def test_sensitivity_and_errors_commands(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "o"
    common = ["--model", str(model_dir), "--data", str(data_dir), "--calib", "8", "--out", str(out), "--no-progress"]
    assert main(["sensitivity", *common, "--eval-images", "8", "--batch-size", "4"]) == 0
    df = pd.read_csv(out / "sensitivity_only_op.csv")
    assert len(df) == 31 - 9 and df["rank"].tolist() == list(range(1, 23))
    assert main(["sensitivity", *common, "--eval-images", "8", "--batch-size", "4"]) == 0
    assert "resuming: 22 of 22 candidates already done" in capsys.readouterr().out
    assert main(["eval", *common, "--preset", "mixed_2", "--mixed-2-from", str(out / "sensitivity_only_op.csv")]) == 0
    fc = df[df["role"].isin(["fc1", "fc2"])].sort_values("rank")["candidate"].head(2).tolist()
    assert all(name in (out / "config_mixed_2.yaml").read_text() for name in fc)
    assert main(["errors", *common, "--images", "8"]) == 0
    acts = pd.read_csv(out / "errors_activations.csv")
    qmodel = QuantModel(load_model(str(model_dir)).model)
    activations = [tq.name for tq in qmodel.tensor_quantizers() if not tq.is_weight]
    assert len(activations) == 31 + 2 * 2  # one per site, two for each matmul (qk, av) of the 2 blocks
    assert sorted(acts["tensor"]) == sorted(activations)  # one row per activation tensor, each once
    assert (out / "errors_channels.npz").is_file()
    assert (out / "errors_weights.csv").is_file()


def test_interrupted_eval_resumes_to_the_same_table(model_dir, data_dir, tmp_path, capsys, monkeypatch):
    import analysis.evaluate as ev

    args = ["eval", "--model", str(model_dir), "--data", str(data_dir), "--calib", "8", "--no-progress",
            "--batch-size", "4"]
    assert main(args + ["--out", str(tmp_path / "whole")]) == 0
    real = ev.stream

    def dies_on_the_second_batch(*a, **k):
        for n, item in enumerate(real(*a, **k)):
            if n == 1:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(ev, "stream", dies_on_the_second_batch)
    assert main(args + ["--out", str(tmp_path / "cut")]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert not (tmp_path / "cut" / "eval.csv").exists()
    monkeypatch.setattr(ev, "stream", real)
    assert main(args + ["--out", str(tmp_path / "cut")]) == 0
    assert "resuming: 4 of 12 images already evaluated" in capsys.readouterr().out
    for name in ("eval.csv", "eval.json"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_interrupted_error_analysis_resumes_to_the_same_tables(model_dir, data_dir, tmp_path, capsys, monkeypatch):
    import analysis.errors as er

    args = ["errors", "--model", str(model_dir), "--data", str(data_dir), "--calib", "8", "--no-progress",
            "--batch-size", "4", "--images", "12"]
    assert main(args + ["--out", str(tmp_path / "whole")]) == 0
    real, calls = er._Analyzer.run_batch, {"n": 0}

    def dies_on_the_second_batch(self, pixels):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, pixels)

    monkeypatch.setattr(er._Analyzer, "run_batch", dies_on_the_second_batch)
    assert main(args + ["--out", str(tmp_path / "cut")]) == 130
    monkeypatch.setattr(er._Analyzer, "run_batch", real)
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "cut")]) == 0
    assert "resuming: 1 batches (4 images) already analysed" in capsys.readouterr().out
    for name in ("errors_activations.csv", "errors_activations.json", "errors_weights.csv"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_plan_end_to_end_writes_a_loadable_plan_and_confirms_it(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "p"
    common = ["--model", str(model_dir), "--data", str(data_dir), "--calib", "8", "--out", str(out), "--no-progress"]
    assert main(["plan", *common, "--eval-images", "6", "--max-kl", "0", "--max-steps", "3", "--batch-size", "3",
                 "--cost", "macs"]) == 0
    printed = capsys.readouterr().out
    assert "NOT met" in printed  # KL 0 is out of reach with any int8 site
    steps = json.loads((out / "plan_steps.json").read_text())
    meta = steps["meta"]
    assert meta["plan_images"] == 6 and meta["confirm_images"] == 6 and meta["met"] is False
    assert meta["verdict"] in printed
    tried = pd.read_csv(out / "plan_tried.csv")
    assert tried["attempt"].tolist() == list(range(len(tried)))
    assert len(tried[tried["kind"] == "float"]) <= 3 * 2  # at most --max-steps per path, two paths
    confirm = pd.read_csv(out / "plan_confirm.csv")
    assert confirm["config"].tolist() == ["fp32", "all", "mixed_1", "mixed_2", "nncf", "plan"]
    # the plan file is a QuantConfig that vitq eval accepts, and its skip-list names real sites
    assert main(["eval", *common, "--preset", "all", "--config", str(out / "plan.yaml")]) == 0
    ev = pd.read_csv(out / "eval.csv").set_index("config")
    chosen = pd.DataFrame(steps["rows"]).query("plan").iloc[0]
    assert ev.loc["plan", "float_sites"] == chosen["float_sites"]  # one count, planner and eval alike
