"""main_pretrain.py end to end on demo images: learning, logs, exact resume, DDP equivalence, bad inputs."""
import builtins
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import main_pretrain
import models_lut
import micro_pretrain  # noqa: F401  (registers the micro models)
from runs import (MICRO_PRETRAIN, ROOT, TORCHRUN, ENV, assert_same_state, assert_same_training_state, epoch_log,
                  run as run_cmd)
from util.checkpoint import load_checkpoint


PRETRAIN_FLAGS = ["--model", "lut_vit_micro", "--input_size", "32", "--patch_size", "8", "--batch_size", "16",
                  "--warmup_epochs", "1", "--num_workers", "0", "--head_mlp_dim", "64", "--print_freq", "4"]


def run(*flags, model="lut_vit_micro", check=True, launcher=(sys.executable,)):
    """tests/micro_pretrain.py with PRETRAIN_FLAGS (model replaced by `model`) and `flags`."""
    return run_cmd([*launcher, MICRO_PRETRAIN, *PRETRAIN_FLAGS, "--model", model, *flags], check=check)


def refusal(monkeypatch, *flags):
    """The one-line message (a SystemExit's, so no traceback) with which main_pretrain.main on the micro model stops
    before anything is built or written."""
    monkeypatch.setattr(builtins, "print", builtins.print)  # main() silences print on ranks other than 0
    args = main_pretrain.get_args_parser().parse_args([*PRETRAIN_FLAGS, *map(str, flags)])
    with pytest.raises(SystemExit) as stop:
        main_pretrain.main(args)
    return str(stop.value)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["lut_vit_micro", "mae_vit_micro"])
def test_pretraining_learns_and_writes_checkpoint_logs_and_tensorboard(flat_images, tmp_path, model):
    out = tmp_path / "out"
    proc = run("--data_path", flat_images, "--output_dir", out, "--epochs", "4", "--lr", "2e-3", model=model)
    log = epoch_log(out)
    assert [r["epoch"] for r in log] == [0, 1, 2, 3]
    losses = [r["train_loss"] for r in log]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses
    if model == "lut_vit_micro":
        assert {"train_mim", "train_bc", "train_momentum"} <= log[0].keys()
    ckpt = load_checkpoint(out / "checkpoint-last.pth")
    assert ckpt["epoch"] == 3 and ckpt["global_step"] == 4 * 16 and isinstance(ckpt["args"], dict)
    assert ("model_ema" in ckpt) == (model == "lut_vit_micro")  # MAE has no teacher
    assert (out / "checkpoint-3.pth").exists()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out))
    for word in ("eta", "lr", "img/s", "mem", "loss"):
        assert word in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [5, 16], ids=["mid_epoch", "epoch_boundary"])
def test_resume_is_bitwise_identical(flat_images, tmp_path, stop_at):
    common = ["--data_path", flat_images, "--epochs", "2", "--seed", "3"]
    run(*common, "--output_dir", tmp_path / "straight")
    first = run(*common, "--output_dir", tmp_path / "resumed", "--stop_at_step", stop_at)
    assert f"step {stop_at % 16}" in first.stdout or stop_at == 16
    second = run(*common, "--output_dir", tmp_path / "resumed")
    assert "Resumed from" in second.stdout
    assert_same_training_state(tmp_path / "straight" / "checkpoint-last.pth",
                               tmp_path / "resumed" / "checkpoint-last.pth")
    # One log line per epoch, and a mid-epoch stop does not change the epoch means.
    straight, resumed = epoch_log(tmp_path / "straight"), epoch_log(tmp_path / "resumed")
    assert [r["epoch"] for r in resumed] == [0, 1]
    for a, b in zip(straight, resumed):
        assert a.keys() == b.keys()
        assert all(b[k] == pytest.approx(a[k], rel=1e-6) for k in a)


@pytest.mark.slow
def test_resume_is_bitwise_identical_with_workers_and_accumulation(flat_images, tmp_path):
    common = ["--data_path", flat_images, "--epochs", "1", "--accum_iter", "2", "--num_workers", "2"]
    run(*common, "--output_dir", tmp_path / "straight")
    run(*common, "--output_dir", tmp_path / "resumed", "--stop_at_step", 3)
    run(*common, "--output_dir", tmp_path / "resumed")
    assert_same_training_state(tmp_path / "straight" / "checkpoint-last.pth",
                               tmp_path / "resumed" / "checkpoint-last.pth")


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_the_global_batch(flat_images, tmp_path):
    common = ["--data_path", flat_images, "--epochs", "1", "--stop_at_step", "2", "--dump_weights"]
    run(*common, "--output_dir", tmp_path / "ddp", "--batch_size", "8", "--device", "cpu", launcher=TORCHRUN)
    run(*common, "--output_dir", tmp_path / "single", "--batch_size", "16")
    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pth") for r in (0, 1))
    assert_same_state(rank0, rank1)  # ranks agree
    single = torch.load(tmp_path / "single" / "rank0.pth")
    for k in single:
        torch.testing.assert_close(rank0[k].float(), single[k].float(), rtol=1e-4, atol=1e-5, msg=k)
    a = load_checkpoint(tmp_path / "ddp" / "checkpoint-last.pth")
    b = load_checkpoint(tmp_path / "single" / "checkpoint-last.pth")
    for k in b["model_ema"]:
        torch.testing.assert_close(a["model_ema"][k].float(), b["model_ema"][k].float(), rtol=1e-4, atol=1e-5)


def truncate(path):
    """What a partial copy leaves: the file without its end."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_a_damaged_resume_file_stops_in_one_line_naming_it(flat_images, tmp_path):
    bad = tmp_path / "from_elsewhere.pth"
    run("--data_path", flat_images, "--output_dir", tmp_path / "first", "--epochs", "1", "--stop_at_step", "2")
    shutil.copy(tmp_path / "first" / "checkpoint-last.pth", bad)
    truncate(bad)
    proc = run("--data_path", flat_images, "--output_dir", tmp_path / "out", "--resume", bad, "--epochs", "1",
               check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"checkpoint {bad} cannot be read, it is truncated")


@pytest.mark.slow
def test_a_damaged_checkpoint_last_is_continued_past_from_the_newest_readable_checkpoint(flat_images, tmp_path):
    common = ["--data_path", flat_images, "--epochs", "2"]
    run(*common, "--output_dir", tmp_path / "straight")
    out = tmp_path / "out"
    run(*common, "--output_dir", out, "--stop_at_step", "20")  # epoch 0 ends at step 16, then 4 steps of epoch 1
    last, previous = out / "checkpoint-last.pth", out / "checkpoint-previous.pth"
    assert (load_checkpoint(previous)["epoch"], load_checkpoint(previous)["epoch_step"]) == (0, 16)
    assert (load_checkpoint(last)["epoch"], load_checkpoint(last)["epoch_step"]) == (1, 4)
    truncate(last)
    proc = run(*common, "--output_dir", out)  # the requeue
    assert f"WARNING: checkpoint {last} cannot be read, it is truncated or corrupt" in proc.stdout
    assert f"continuing from the newest readable checkpoint of the run, {previous}" in proc.stdout
    assert (out / "checkpoint-last.pth.damaged").read_bytes() != last.read_bytes()  # kept aside, not lost
    assert_same_training_state(tmp_path / "straight" / "checkpoint-last.pth", last)
    assert epoch_log(out) == epoch_log(tmp_path / "straight")


def test_a_run_folder_without_a_readable_checkpoint_stops_in_one_line_and_does_not_start_afresh(flat_images,
                                                                                               tmp_path):
    run("--data_path", flat_images, "--output_dir", tmp_path, "--epochs", "1", "--stop_at_step", "2")
    truncate(tmp_path / "checkpoint-last.pth")
    proc = run("--data_path", flat_images, "--output_dir", tmp_path, "--epochs", "1", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(
        f"and {tmp_path} holds no other readable checkpoint: restore it, or move it away to start this run afresh")
    assert not (tmp_path / "log.txt").exists()


def test_non_finite_loss_stops_and_keeps_last_checkpoint(flat_images, tmp_path):
    out = tmp_path / "out"
    run("--data_path", flat_images, "--output_dir", out, "--epochs", "2", "--stop_at_step", "16")
    before = (out / "checkpoint-last.pth").read_bytes()
    proc = run("--data_path", flat_images, "--output_dir", out, "--epochs", "2", "--lr", "1e38", check=False)
    assert proc.returncode != 0
    assert "non-finite loss in the iterations up to" in proc.stderr
    assert (out / "checkpoint-last.pth").read_bytes() == before


@pytest.mark.parametrize("setup,message", [
    ("missing", "does not exist"),
    ("empty", "no images"),
    ("corrupt", "broken.png"),
])
def test_bad_data_path_fails_early_with_clear_message(monkeypatch, tmp_path, setup, message):
    data = tmp_path / "data"
    if setup != "missing":
        data.mkdir()
    if setup == "corrupt":
        (data / "broken.png").write_bytes(b"not a png")
    assert message in refusal(monkeypatch, "--data_path", data, "--output_dir", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (("--mask_ratio", "0.4"), "--mask_ratio >= 0.5"),
    (("--mask_ratio", "0.99"), "--mask_ratio 0.99 leaves no visible patch of 16 (32 px, patch 8)"),
    (("--batch_size", "1"), "--batch_size must be at least 2"),  # BatchNorm heads would fail in the first step
])
def test_incompatible_lut_arguments_are_refused_before_training(monkeypatch, flat_images, tmp_path, flags, message):
    assert message in refusal(monkeypatch, "--data_path", flat_images, "--output_dir", tmp_path / "out", *flags)
    assert not (tmp_path / "out").exists()


def test_the_method_is_asked_of_the_model_not_read_from_its_name(monkeypatch, flat_images):
    monkeypatch.setitem(models_lut.MODELS, "my_student", models_lut.MODELS["lut_vit_micro"])
    monkeypatch.setitem(models_lut.MODELS, "my_baseline", models_lut.MODELS["mae_vit_micro"])
    for name, rule, views in (("my_student", "sqrt", 2), ("my_baseline", "linear", 1)):
        flags = [*PRETRAIN_FLAGS, "--model", name, "--data_path", str(flat_images)]
        args = main_pretrain.get_args_parser().parse_args(flags)
        args.world_size = 1
        main_pretrain.check_args(args)
        assert args.lr_scale == rule  # each method's published lr rule
        assert models_lut.model_class(name).num_views == views
    args = main_pretrain.get_args_parser().parse_args([*PRETRAIN_FLAGS, "--model", "my_student", "--data_path",
                                                       str(flat_images), "--mask_ratio", "0.4"])
    args.world_size = 1
    with pytest.raises(SystemExit, match="--mask_ratio >= 0.5"):
        main_pretrain.check_args(args)


def test_one_image_per_rank_is_allowed_when_batchnorm_statistics_span_ranks(flat_images):
    args = main_pretrain.get_args_parser().parse_args(["--data_path", str(flat_images), "--batch_size", "1"])
    args.world_size = 2  # as init_distributed sets it: the heads' BatchNorm is synchronised, 2 images per view
    assert len(main_pretrain.check_args(args)) == 256
    args.world_size = 1
    with pytest.raises(SystemExit, match="--batch_size must be at least 2"):
        main_pretrain.check_args(args)


def test_resuming_another_architecture_or_image_size_is_refused_in_one_line(flat_images, tmp_path):
    run("--data_path", flat_images, "--output_dir", tmp_path, "--epochs", "1", "--stop_at_step", "1",
        model="mae_vit_micro")
    proc = run("--data_path", flat_images, "--output_dir", tmp_path, "--epochs", "1", check=False)
    assert proc.returncode == 1 and "was trained as mae_vit_micro" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("--data_path", flat_images, "--output_dir", tmp_path, "--epochs", "1", "--input_size", "48",
               model="mae_vit_micro", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "(trained with {'input_size': 32, 'patch_size': 8}) does not fit this run's model (input_size 48" \
        in proc.stderr


@pytest.mark.slow
def test_sigusr2_checkpoints_at_a_step_boundary_and_resume_is_exact(flat_images, tmp_path):
    common = ["--data_path", flat_images, "--epochs", "4"]  # 55 steps after the signal's: it lands mid-run
    run(*common, "--output_dir", tmp_path / "straight")
    cmd = [sys.executable, MICRO_PRETRAIN, *PRETRAIN_FLAGS, *map(str, common), "--output_dir",
           str(tmp_path / "signalled")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=ENV)
    for line in proc.stdout:
        if "Epoch [0] [ 8/16]" in line:
            proc.send_signal(signal.SIGUSR2)
            break
    output = proc.stdout.read()
    assert proc.wait(timeout=300) == 0, output
    assert "SIGUSR2 received: stopping after optimizer step" in output
    ckpt = load_checkpoint(tmp_path / "signalled" / "checkpoint-last.pth")
    assert ckpt["global_step"] < 2 * 16  # stopped in epoch 0 or 1, not at the end
    run(*common, "--output_dir", tmp_path / "signalled")
    assert_same_training_state(tmp_path / "straight" / "checkpoint-last.pth",
                               tmp_path / "signalled" / "checkpoint-last.pth")


@pytest.mark.slow
def test_unreadable_images_met_in_training_are_replaced_counted_and_stop_the_run_beyond_max_unreadable(flat_images,
                                                                                                   tmp_path):
    data = tmp_path / "data"
    shutil.copytree(flat_images, data)
    (data / "005.png").write_bytes(b"broken")  # not among the files checked at start
    proc = run("--data_path", data, "--output_dir", tmp_path / "out", "--epochs", "1", "--max_unreadable", "0.01")
    assert f"WARNING: cannot read image file {data / '005.png'}" in proc.stderr
    assert epoch_log(tmp_path / "out")[0]["train_unreadable_images"] == 1
    proc = run("--data_path", data, "--output_dir", tmp_path / "strict", "--epochs", "1", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "1 of 256 images could not be read (more than --max_unreadable 0.001)" in proc.stderr
