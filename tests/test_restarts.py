"""Kills, restarts, requeues and a second run in the same folder: whatever happens, a restarted run ends with every
output an uninterrupted run writes, bit for bit, and nothing is lost or mixed."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from runs import (ENV, MICRO_FINETUNE, MICRO_PRETRAIN, ROOT, assert_same_training_state, epoch_log, run)

# Two epochs of 4 optimizer steps (256 of small_demo's 301 training images, batch 64), checkpoint-<epoch> each.
COMMON = ["--input_size", "32", "--patch_size", "8", "--batch_size", "64", "--epochs", "2", "--warmup_epochs", "1",
          "--num_workers", "0", "--print_freq", "2", "--save_freq", "1"]
PRETRAIN = [sys.executable, MICRO_PRETRAIN, "--model", "lut_vit_micro", "--head_mlp_dim", "64", "--knn_freq", "1",
            *COMMON]
FINETUNE = [sys.executable, MICRO_FINETUNE, "finetune", "--model", "vit_micro", *COMMON]


def outputs(out):
    """What a run leaves in its folder: file names, the log, the TensorBoard epoch scalars."""
    names = sorted(n for n in os.listdir(out) if not n.startswith((".lock", "events.out")))
    events = EventAccumulator(str(out))
    events.Reload()
    scalars = {(tag, e.step, e.value) for tag in events.Tags()["scalars"] if tag.startswith(("epoch/", "perf/"))
               for e in events.Scalars(tag)}
    return names, epoch_log(out), scalars


def assert_same_outputs(a, b):
    names, log, scalars = outputs(a)
    assert (names, log, scalars) == outputs(b)
    for name in names:
        if name.endswith(".pth"):
            assert_same_training_state(a / name, b / name)


@pytest.fixture(scope="module")
def uninterrupted(small_demo, tmp_path_factory):
    """Each script's outputs without any interruption."""
    outs = {}
    for name, cmd in (("pretrain", PRETRAIN), ("finetune", FINETUNE)):
        outs[name] = tmp_path_factory.mktemp(name)
        run([*cmd, "--data_path", small_demo, "--output_dir", outs[name]])
    return outs


# File events of an epoch end: before / after a file it writes (the n-th write of that file name). Pre-training: both
# sides of the first epoch's checkpoint, the numbered checkpoint after it, the last epoch's log line; fine-tuning adds
# checkpoint-best.pth (same code, util.checkpoint.save_epoch) and its last log line.
PRETRAIN_KILLS = ["before:checkpoint-last.pth:1", "after:checkpoint-last.pth:1", "after:checkpoint-1.pth:1",
                  "before:log.txt:2"]
FINETUNE_KILLS = ["before:checkpoint-best.pth:1", "after:log.txt:2"]


@pytest.mark.slow
@pytest.mark.parametrize("script, kill", [("pretrain", k) for k in PRETRAIN_KILLS] +
                         [("finetune", k) for k in FINETUNE_KILLS])
def test_a_run_killed_at_any_file_event_restarts_to_the_uninterrupted_outputs(script, kill, small_demo, uninterrupted,
                                                                             tmp_path):
    cmd = [*(PRETRAIN if script == "pretrain" else FINETUNE), "--data_path", small_demo, "--output_dir", tmp_path]
    killed = run(cmd, check=False, env={"KILL_AT": kill})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run(cmd)
    assert_same_outputs(uninterrupted[script], tmp_path)


# A micro script whose background write of the first `name` waits until training has gone on `steps` optimizer
# steps, writes part of the file and SIGKILLs the process: argv script, name, steps, the script's flags.
KILL_IN_FLIGHT = textwrap.dedent("""
    import os, runpy, signal, sys, time
    import torch
    import util.checkpoint
    script, name, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sys.argv = [script, *sys.argv[4:]]
    done, step = [0], torch.amp.GradScaler.step

    def counted(self, *args, **kwargs):
        done[0] += 1
        return step(self, *args, **kwargs)

    def killed_mid_write(f):
        f.write(b"part of a file")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def write_atomically(path, fn, write=util.checkpoint.write_atomically):
        if os.path.basename(path) != name:
            return write(path, fn)
        start, deadline = done[0], time.time() + 60
        while done[0] < start + steps:
            if time.time() > deadline:
                os._exit(3)  # training did not go on while the write was in flight
            time.sleep(0.01)
        write(path, killed_mid_write)

    torch.amp.GradScaler.step, util.checkpoint.write_atomically = counted, write_atomically
    runpy.run_path(script, run_name="__main__")
""")


@pytest.mark.slow
@pytest.mark.parametrize("script, name", [("pretrain", "checkpoint-last.pth"), ("finetune", "checkpoint-best.pth")])
def test_a_run_killed_mid_write_while_training_goes_on_restarts_to_the_uninterrupted_outputs(script, name, small_demo,
                                                                                          uninterrupted, tmp_path):
    cmd = [*(PRETRAIN if script == "pretrain" else FINETUNE), "--data_path", small_demo, "--output_dir", tmp_path]
    killed = run([sys.executable, "-c", KILL_IN_FLIGHT, cmd[1], name, 2, *cmd[2:]], check=False)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    run(cmd)
    assert_same_outputs(uninterrupted[script], tmp_path)


@pytest.mark.slow
def test_a_requeued_run_continues_from_its_own_checkpoint_not_from_resume(small_demo, uninterrupted, tmp_path):
    common = [*PRETRAIN, "--data_path", small_demo, "--resume", uninterrupted["pretrain"] / "checkpoint-0.pth",
              "--output_dir", tmp_path]
    run([*common, "--stop_at_step", "6"])  # stopped mid-epoch 1, as at a time limit
    again = run(common).stdout  # the requeued job: the same arguments
    assert f"not from --resume {uninterrupted['pretrain'] / 'checkpoint-0.pth'}" in again
    assert f"Resumed from {tmp_path / 'checkpoint-last.pth'}: epoch 1, step 2/4" in again
    assert_same_training_state(uninterrupted["pretrain"] / "checkpoint-last.pth", tmp_path / "checkpoint-last.pth")


def test_a_second_run_into_a_folder_in_use_stops_at_once_and_a_dead_runs_lock_does_not_block(flat_images, tmp_path):
    cmd = [*PRETRAIN[:-len(COMMON)], *COMMON, "--data_path", flat_images, "--output_dir", tmp_path, "--knn_freq",
           "0", "--epochs", "100"]
    first = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             cwd=ROOT, env=ENV)
    try:
        for line in first.stdout:  # training has started: the folder is in use
            if line.startswith("Start training"):
                break
        second = run(cmd, check=False)
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert f"is in use by another run (host {os.uname().nodename}, pid {first.pid})" in second.stderr
    finally:
        first.kill()
        first.wait()
    (tmp_path / "checkpoint-last.pth.tmp").write_bytes(b"half a checkpoint")  # as a kill mid-write leaves it
    run([*cmd, "--stop_at_step", "1"])  # the killed run's lock went with it
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
def test_logs_have_maes_keys_and_tensorboard_tags(uninterrupted):
    """Existing MAE dashboards and log parsers work: MAE's log.txt keys (plus ours) and TensorBoard tags."""
    for script, keys, tags in (
            ("pretrain", {"train_loss", "train_lr", "epoch", "n_parameters", "train_mim", "train_bc",
                          "train_knn_top1"}, {"train_loss", "lr"}),
            ("finetune", {"train_loss", "train_lr", "test_acc1", "test_acc5", "test_loss", "epoch", "n_parameters"},
             {"loss", "lr", "perf/test_acc1", "perf/test_acc5", "perf/test_loss"})):
        assert keys <= epoch_log(uninterrupted[script])[-1].keys()
        events = EventAccumulator(str(uninterrupted[script]))
        events.Reload()
        assert tags <= set(events.Tags()["scalars"])
        # the step-wise scalars against MAE's x-axis, epoch_1000x: 2 epochs of 4 steps, a print every 2 steps
        assert [e.step for e in events.Scalars("lr")] == [500, 1000, 1500, 2000]


def test_a_rerun_of_a_finished_job_says_so_and_touches_nothing(flat_images, tmp_path):
    cmd = [*PRETRAIN[:-len(COMMON)], *COMMON, "--data_path", flat_images, "--output_dir", tmp_path, "--knn_freq",
           "0", "--epochs", "1"]
    run(cmd)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again = run(cmd)
    assert f"{tmp_path} holds this run, finished: 1 epochs trained, nothing to do" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    ckpt = torch.load(tmp_path / "checkpoint-last.pth")  # a bare torch.load (weights_only by default) reads it
    assert ckpt["args"]["model"] == "lut_vit_micro" and ckpt["epoch"] == 0
