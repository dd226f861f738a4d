"""main_pretrain.py end to end on the demo data: learning, logs, exact resume, DDP equivalence, bad inputs."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from util.checkpoint import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = os.path.join(ROOT, "tests", "micro_pretrain.py")


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The demo ImageFolder, and a flat folder with 256 of its training images."""
    root = tmp_path_factory.mktemp("demo")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_demo_data.py"), "--out", str(root / "full")],
                   check=True, capture_output=True)
    small = root / "small"
    small.mkdir()
    train = sorted((root / "full" / "train").rglob("*.png"))
    for i, path in enumerate(train[::len(train) // 256][:256]):
        shutil.copy(path, small / f"{i:03d}.png")
    return root


def run(*flags, model="lut_vit_micro", script=MICRO, check=True, launcher=(sys.executable,)):
    cmd = [*launcher, script, "--model", model, "--input_size", "32", "--patch_size", "8", "--batch_size", "16",
           "--warmup_epochs", "1", "--num_workers", "0", "--head_mlp_dim", "64", "--print_freq", "4",
           *map(str, flags)]
    # One thread per process: these models are tiny, and two OpenMP threads per process on a shared 2-core
    # machine spin-wait for each other (100x slower matmuls).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def epoch_log(out):
    with open(os.path.join(out, "log.txt")) as f:
        return [json.loads(line) for line in f]


def assert_same_state(a, b):
    """Bitwise equality of nested dicts / lists of tensors and plain values (state dicts, optimizer states)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y)
    elif torch.is_tensor(a):
        assert torch.equal(a, b)
    else:
        assert a == b


def assert_same_training_state(path_a, path_b):
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    assert a.keys() == b.keys()
    for key in ("model", "model_ema", "optimizer"):
        if key in a:
            assert_same_state(a[key], b[key])
    assert (a["epoch"], a["epoch_step"], a["global_step"]) == (b["epoch"], b["epoch_step"], b["global_step"])


@pytest.mark.slow
@pytest.mark.parametrize("model", ["lut_vit_micro", "mae_vit_micro"])
def test_pretraining_learns_and_writes_checkpoint_logs_and_tensorboard(demo, tmp_path, model):
    out = tmp_path / "out"
    proc = run("--data_path", demo / "small", "--output_dir", out, "--epochs", "4", "--lr", "2e-3", model=model)
    log = epoch_log(out)
    assert [r["epoch"] for r in log] == [0, 1, 2, 3]
    losses = [r["train_loss"] for r in log]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses
    if model.startswith("lut"):
        assert {"train_mim", "train_bc", "train_momentum"} <= log[0].keys()
    ckpt = load_checkpoint(out / "checkpoint-last.pth")
    assert ckpt["epoch"] == 3 and ckpt["global_step"] == 4 * 16 and isinstance(ckpt["args"], dict)
    assert ("model_ema" in ckpt) == model.startswith("lut")  # MAE has no teacher
    assert (out / "checkpoint-3.pth").exists()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out))
    for word in ("eta", "lr", "img/s", "mem", "loss"):
        assert word in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [5, 16], ids=["mid_epoch", "epoch_boundary"])
def test_resume_is_bitwise_identical(demo, tmp_path, stop_at):
    common = ["--data_path", demo / "small", "--epochs", "2", "--seed", "3"]
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
def test_resume_is_bitwise_identical_with_workers_and_accumulation(demo, tmp_path):
    common = ["--data_path", demo / "small", "--epochs", "1", "--accum_iter", "2", "--num_workers", "2"]
    run(*common, "--output_dir", tmp_path / "straight")
    run(*common, "--output_dir", tmp_path / "resumed", "--stop_at_step", 3)
    run(*common, "--output_dir", tmp_path / "resumed")
    assert_same_training_state(tmp_path / "straight" / "checkpoint-last.pth",
                               tmp_path / "resumed" / "checkpoint-last.pth")


TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_the_global_batch(demo, tmp_path):
    common = ["--data_path", demo / "small", "--epochs", "1", "--stop_at_step", "2", "--dump_weights"]
    run(*common, "--output_dir", tmp_path / "ddp", "--batch_size", "8", launcher=TORCHRUN)
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


def test_non_finite_loss_stops_and_keeps_last_checkpoint(demo, tmp_path):
    out = tmp_path / "out"
    run("--data_path", demo / "small", "--output_dir", out, "--epochs", "2", "--stop_at_step", "16")
    before = (out / "checkpoint-last.pth").read_bytes()
    proc = run("--data_path", demo / "small", "--output_dir", out, "--epochs", "2", "--lr", "1e38", check=False)
    assert proc.returncode != 0
    assert "non-finite loss at optimizer step" in proc.stdout + proc.stderr
    assert (out / "checkpoint-last.pth").read_bytes() == before


@pytest.mark.parametrize("setup,message", [
    ("missing", "does not exist"),
    ("empty", "no images"),
    ("corrupt", "broken.png"),
])
def test_bad_data_path_fails_early_with_clear_message(tmp_path, setup, message):
    data = tmp_path / "data"
    if setup != "missing":
        data.mkdir()
    if setup == "corrupt":
        (data / "broken.png").write_bytes(b"not a png")
    proc = run("--data_path", data, "--output_dir", tmp_path / "out", check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and "trainable parameters" not in proc.stdout


@pytest.mark.parametrize("flags, message", [
    (("--mask_ratio", "0.4"), "--mask_ratio >= 0.5"),
    (("--batch_size", "1"), "--batch_size must be at least 2"),  # BatchNorm heads would fail in the first step
])
def test_incompatible_lut_arguments_are_refused_before_training(demo, tmp_path, flags, message):
    proc = run("--data_path", demo / "small", "--output_dir", tmp_path, *flags, check=False)
    assert proc.returncode != 0 and message in proc.stderr
    assert "Traceback" not in proc.stderr and not os.listdir(tmp_path)


def test_one_image_per_rank_is_allowed_when_batchnorm_statistics_span_ranks(demo):
    import main_pretrain
    args = main_pretrain.get_args_parser().parse_args(["--data_path", str(demo / "small"), "--batch_size", "1"])
    args.world_size = 2  # as init_distributed sets it: the heads' BatchNorm is synchronised, 2 images per view
    assert len(main_pretrain.check_args(args)) == 256
    args.world_size = 1
    with pytest.raises(SystemExit, match="--batch_size must be at least 2"):
        main_pretrain.check_args(args)


def test_resuming_another_architecture_is_refused(demo, tmp_path):
    run("--data_path", demo / "small", "--output_dir", tmp_path, "--epochs", "1", "--stop_at_step", "1",
        model="mae_vit_micro")
    proc = run("--data_path", demo / "small", "--output_dir", tmp_path, "--epochs", "1", check=False)
    assert proc.returncode != 0 and "was trained as mae_vit_micro" in proc.stderr


@pytest.mark.slow
def test_sigusr2_checkpoints_at_a_step_boundary_and_resume_is_exact(demo, tmp_path):
    common = ["--data_path", demo / "small", "--epochs", "20"]  # long enough for the signal to land mid-run
    run(*common, "--output_dir", tmp_path / "straight")
    cmd = [sys.executable, MICRO, "--model", "lut_vit_micro", "--input_size", "32", "--patch_size", "8",
           "--batch_size", "16", "--warmup_epochs", "1", "--num_workers", "0", "--head_mlp_dim", "64",
           "--print_freq", "4", *map(str, common), "--output_dir", str(tmp_path / "signalled")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:
        if "Epoch [0] [ 8/16]" in line:
            proc.send_signal(signal.SIGUSR2)
            break
    output = proc.stdout.read()
    assert proc.wait(timeout=300) == 0, output
    assert "SIGUSR2 received: stopping after optimizer step" in output
    ckpt = load_checkpoint(tmp_path / "signalled" / "checkpoint-last.pth")
    assert ckpt["global_step"] < 20 * 16
    run(*common, "--output_dir", tmp_path / "signalled")
    assert_same_training_state(tmp_path / "straight" / "checkpoint-last.pth",
                               tmp_path / "signalled" / "checkpoint-last.pth")
