"""`--shard i/n`: n processes split the sensitivity candidates, the next unsharded run merges their logs."""

import json
import re

import pandas as pd
import pytest

from analysis.sensitivity import make_candidates
from quant.presets import preset
from quant.store import read_log
from tests.test_cli import data_dir, model_dir  # noqa: F401  (module fixtures)
from tests.test_sensitivity import _run, _setup
from vitq.cli import ShardError, main, parse_shard


def test_shards_split_the_candidates_and_an_unsharded_run_merges_them(tmp_path, capsys):
    qm, pixels, labels = _setup()
    out = tmp_path / "sharded"
    first, m0 = _run(qm, pixels, labels, out, shard=(0, 2))
    second, m1 = _run(qm, pixels, labels, out, shard=(1, 2))
    names = [set(first["candidate"]), set(second["candidate"])]
    total = m0["candidates_total"]
    assert not names[0] & names[1] and len(names[0] | names[1]) == total == m1["candidates_total"]
    assert (m0["shard"], m1["shard"]) == ("0/2", "1/2") and m0["candidates"] + m1["candidates"] == total
    assert m0["run"]["measured_now"] == m0["candidates"] and m1["run"]["measured_now"] == m1["candidates"]
    assert all(".shard-" in p.name for p in out.glob("*.jsonl"))  # shards never write the main log

    capsys.readouterr()
    merged, meta = _run(qm, pixels, labels, out)
    assert meta["run"]["measured_now"] == 0 and meta["run"]["merged_from_shards"] == total
    assert f"merged {total} candidates from 2 shard log(s)" in capsys.readouterr().out
    scratch, _ = _run(qm, pixels, labels, tmp_path / "scratch")
    pd.testing.assert_frame_equal(merged, scratch)  # exact: the same numbers, the same ranks

    # the main log now holds every row: the result survives deleting the shard logs
    for path in out.glob("sensitivity_only_op.*.shard-*.jsonl"):
        path.unlink()
    again, meta = _run(qm, pixels, labels, out)
    assert meta["run"]["measured_now"] == 0 and meta["run"]["merged_from_shards"] == 0
    pd.testing.assert_frame_equal(again, scratch)


def test_a_shard_skips_what_any_log_holds_and_measures_the_rest(tmp_path):
    qm, pixels, labels = _setup()
    names = [c.name for c in make_candidates(qm.sites, preset("mixed_1", qm.sites), "op")]
    _, meta = _run(qm, pixels, labels, tmp_path, only=[names[0], names[1], names[3]])  # shard 0/3 gets 0 and 3
    assert meta["run"]["measured_now"] == 3
    part, meta = _run(qm, pixels, labels, tmp_path, shard=(0, 3))
    assert sorted(part["candidate"]) == sorted(names[0::3])
    assert meta["run"]["measured_now"] == meta["candidates"] - 2
    # a shard split of another size merges too; more shards than candidates leave some empty
    _, meta = _run(qm, pixels, labels, tmp_path, shard=(1, 3))
    _, meta = _run(qm, pixels, labels, tmp_path, shard=(2, 3))
    empty, meta = _run(qm, pixels, labels, tmp_path, shard=(99, 100))
    assert empty.empty and meta["candidates"] == 0 and meta["run"]["measured_now"] == 0
    _, meta = _run(qm, pixels, labels, tmp_path)
    assert meta["run"]["measured_now"] == 0


def test_a_shard_log_of_other_settings_is_not_merged(tmp_path):
    qm, pixels, labels = _setup()
    _run(qm, pixels, labels, tmp_path, shard=(0, 2))
    [log] = tmp_path.glob("sensitivity_only_op.*.shard-0-of-2.jsonl")
    lines = log.read_text().splitlines()
    header = json.loads(lines[0])
    header["settings"]["images"] = 1  # as if another image set had been measured under this name
    log.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    assert read_log(log) and not read_log(log, {"other": 1})
    _, meta = _run(qm, pixels, labels, tmp_path)
    assert meta["run"]["merged_from_shards"] == 0 and meta["run"]["measured_now"] == meta["candidates"]


def test_bad_shard_index_is_refused(tmp_path):
    qm, pixels, labels = _setup()
    with pytest.raises(ValueError, match="0 <= i < n"):
        _run(qm, pixels, labels, tmp_path, shard=(2, 2))


def test_shard_auto_reads_torchrun_environment():
    assert parse_shard("auto", {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == (1, 2)
    assert parse_shard("2/3", {}) == (2, 3) and parse_shard(None, {}) is None
    with pytest.raises(ShardError, match="RANK and WORLD_SIZE are not set"):
        parse_shard("auto", {})
    with pytest.raises(ShardError, match="--shard auto: RANK='2', WORLD_SIZE='2' \\(torchrun's\\)"):
        parse_shard("auto", {"RANK": "2", "WORLD_SIZE": "2"})


def test_shard_auto_takes_the_gpu_of_its_local_rank(monkeypatch):
    import argparse

    import torch

    from vitq.cli import _shard_device

    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for shard, device, expected in [("auto", "auto", "cuda:1"), ("auto", "cuda", "cuda:1"), ("auto", "cpu", "cpu"),
                                    ("auto", "cuda:0", "cuda:0"), ("1/2", "auto", "auto")]:
        args = argparse.Namespace(shard=shard, device=device)
        _shard_device(args, env)
        assert args.device == expected, (shard, device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = argparse.Namespace(shard="auto", device="auto")
    _shard_device(args, env)
    assert args.device == "auto"  # CPU processes: resolve_device picks the CPU


@pytest.mark.parametrize("value", ["3/2", "x", "0/0", "-1/2", "1/2/3", "1/"])
def test_bad_shard_is_a_one_line_error(value, capsys):
    # refused before the model is loaded: no --model or --data needed
    assert main(["sensitivity", f"--shard={value}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vitq: error: --shard {value}: expected I/N") and err.count("\n") == 1
    assert "Traceback" not in err


RANKS = "expected integers with 0 <= RANK < WORLD_SIZE"
LOCAL = "expected a GPU index 0..1 (2 CUDA device(s) visible: at most 2 processes per node)"


@pytest.mark.parametrize("env, message", [
    ({"RANK": "x", "WORLD_SIZE": "2"}, f"RANK='x', WORLD_SIZE='2' (torchrun's): {RANKS}"),
    ({"RANK": "1", "WORLD_SIZE": "two"}, f"RANK='1', WORLD_SIZE='two' (torchrun's): {RANKS}"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, f"RANK='2', WORLD_SIZE='2' (torchrun's): {RANKS}"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, f"RANK='-1', WORLD_SIZE='2' (torchrun's): {RANKS}"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, f"RANK='0', WORLD_SIZE='0' (torchrun's): {RANKS}"),
    ({"RANK": "1\n", "WORLD_SIZE": "2\n3"}, f"RANK='1\\n', WORLD_SIZE='2\\n3' (torchrun's): {RANKS}"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "x"}, f"LOCAL_RANK='x' (torchrun's): {LOCAL}"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "2"}, f"LOCAL_RANK='2' (torchrun's): {LOCAL}"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "-1"}, f"LOCAL_RANK='-1' (torchrun's): {LOCAL}"),
])
def test_a_bad_torchrun_environment_is_a_one_line_error(env, message, monkeypatch, capsys):
    # refused before the model is loaded, on a node with 2 GPUs
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["sensitivity", "--shard", "auto", "--no-progress"]) == 2
    assert capsys.readouterr().err == f"vitq: error: --shard auto: {message}\n"


def test_shard_auto_from_env_through_the_cli(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["sensitivity", "--shard", "auto", "--no-progress"]) == 2
    assert "RANK and WORLD_SIZE are not set" in capsys.readouterr().err


def test_sharded_cli_runs_then_the_unsharded_command_merges(model_dir, data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    common = ["sensitivity", "--model", str(model_dir), "--data", str(data_dir), "--calib", "8", "--out", str(out),
              "--no-progress", "--eval-images", "8", "--batch-size", "4", "--device", "cpu"]
    assert main([*common, "--shard", "0/2"]) == 0
    printed = capsys.readouterr().out
    assert "shard 0/2: 11 of 22 candidates (11 measured now)" in printed and "without --shard" in printed
    assert not (out / "sensitivity_only_op.csv").exists()  # a partial table is no artefact
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")  # ignored: --device cpu
    assert main([*common, "--shard", "auto"]) == 0
    assert "shard 1/2: 11 of 22 candidates (11 measured now)" in capsys.readouterr().out
    assert main(common) == 0
    printed = capsys.readouterr().out
    assert "merged 22 candidates from 2 shard log(s)" in printed and "resuming: 22 of 22" in printed
    table = pd.read_csv(out / "sensitivity_only_op.csv")
    assert len(table) == 22 and table["rank"].tolist() == list(range(1, 23))
    run = json.loads((out / "sensitivity_only_op.run.json").read_text())
    assert run["measured_now"] == 0 and run["merged_from_shards"] == 22


def _dead_pid() -> int:
    """The PID of a process that has ended (and been reaped)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_scratch_cleanup_removes_only_dead_runs_of_this_host(tmp_path, monkeypatch):
    # several hosts write into one shared output folder: a folder whose PID is not alive
    # *here* may belong to a live run on another host, so only this host's are judged
    import os
    import socket

    from analysis.runner import scratch

    monkeypatch.setattr(socket, "gethostname", lambda: "node-7.cluster")  # dashes and dots in the name
    dead, alive = _dead_pid(), os.getpid()
    names = {"mine_dead": f"vitq-sens-node-7.cluster-{dead}-x1", "mine_alive": f"vitq-sens-node-7.cluster-{alive}-x2",
             "other_dead": f"vitq-sens-node-8.cluster-{dead}-x3", "other_alive": f"vitq-sens-node-8.cluster-{alive}-x4",
             "other_suffix": f"vitq-sens-node-7-{dead}-x5"}  # host "node-7", not "node-7.cluster"
    for name in names.values():
        (tmp_path / name / "bounds").mkdir(parents=True)
    with scratch(tmp_path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f"vitq-sens-node-7.cluster-{alive}-")
        left = {p.name for p in tmp_path.iterdir()} - {tmp.name}
    assert left == {names[k] for k in ("mine_alive", "other_dead", "other_alive", "other_suffix")}
    assert not tmp.exists()  # its own folder goes on exit


def test_scratch_folders_without_a_host_are_left_with_a_warning(tmp_path):
    # the name of an older vitq's scratch folder does not say which host made it
    from analysis.runner import scratch

    legacy = tmp_path / f"vitq-sens-{_dead_pid()}-ab12cd"
    legacy.mkdir()
    with pytest.warns(UserWarning, match=re.escape(f"scratch folder {legacy} does not name its host")):
        with scratch(tmp_path):
            pass
    assert legacy.is_dir()


def test_the_settings_name_the_device_type_except_the_cpu(model_dir, data_dir, tmp_path):  # noqa: F811
    # a CUDA run must not reuse a CPU run's log rows or calibration (nor the reverse); the CPU
    # keeps the settings it had before the device was in them, so its logs stay usable
    import torch

    from quant.presets import preset as make_preset
    from vitq.pipeline import run_eval, save_eval
    from vitq.session import Options, Session

    session = Session(Options(model=str(model_dir), data=str(data_dir), out=str(tmp_path), calib=8, batch_size=4,
                              progress=False, device="cpu"))
    session.calibrate()
    context = ["calibration_images", "data", "family", "model", "seed", "torch", "transformers"]
    assert sorted(session.settings()) == context == sorted(session.describe())
    configs = {"all": make_preset("all", session.sites)}
    _, _, on_cpu = run_eval(session, configs)
    # the same session claiming a GPU (the model stays on the CPU: only the settings change)
    session.device = torch.device("cuda:1")
    settings = session.settings()
    assert (settings["device"], settings["tf32"]) == ("cuda", False)
    df, meta, on_gpu = run_eval(session, configs)
    assert on_gpu["resumed_images"] == 0 and on_gpu["log"] != on_cpu["log"]
    assert sorted(session.describe()) == context  # the tables' meta keeps its schema:
    save_eval(session, df, meta, on_gpu, configs)  # the artefact is written
    session.device = torch.device("cuda:0")  # another GPU index: the same log (the shards of one torchrun)
    _, _, other_gpu = run_eval(session, configs)
    assert other_gpu["resumed_images"] == 12 and other_gpu["log"] == on_gpu["log"]
    session.opts.tf32 = True  # TF32 changes CUDA's numbers: another log
    assert run_eval(session, configs)[2]["resumed_images"] == 0
    session.calibrate()  # and the CPU's calibration cache is not taken for the GPU's
    assert torch.load(tmp_path / "calibration.pt", weights_only=False)["key"]["device"] == "cuda"
    session.device = torch.device("cpu")  # TF32 does nothing on the CPU: the CPU log again
    _, _, back = run_eval(session, configs)
    assert back["resumed_images"] == 12 and back["log"] == on_cpu["log"]
