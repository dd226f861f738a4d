"""Checkpoints saved in the background (util.checkpoint.save_in_background): what the file holds while training goes
on, when the training thread waits, how a failed write stops the run, and the epoch's other outputs."""
import argparse
import builtins
import copy
import errno
import os
import re
import threading
import time

import pytest
import torch
from torch import nn

import util.checkpoint as ck
from runs import assert_same_state
from util.rng import rng_state
from util.run import end_run

GATE_S = 5  # how long a held write waits for the test to let it go


@pytest.fixture(autouse=True)
def collect_saves():
    """Every test leaves no background save behind (a failed one fails the test)."""
    yield
    ck.wait_for_saves()


@pytest.fixture
def gate(monkeypatch):
    """An Event: background saves of checkpoint-last.pth wait for it (at most GATE_S) before they write."""
    event, write = threading.Event(), ck.write_atomically

    def held(path, fn):
        if os.path.basename(path) == "checkpoint-last.pth":
            event.wait(GATE_S)
        write(path, fn)
    monkeypatch.setattr(ck, "write_atomically", held)
    yield event
    event.set()


def training(tmp_path):
    """args, model (BatchNorm: buffers and module versions), teacher, AdamW with moments, scaler."""
    torch.manual_seed(0)
    args = argparse.Namespace(output_dir=str(tmp_path), steps_per_epoch=2, epochs=3, save_freq=1, model="tiny")
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    train_step(model, optimizer)
    return args, model, copy.deepcopy(model), optimizer, torch.amp.GradScaler("cpu", enabled=False)


def train_step(model, optimizer):
    """Changes weights, moments and BatchNorm statistics in place."""
    model(torch.randn(16, 4)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def save(args, model, teacher, optimizer, scaler, epoch=0, epoch_step=1):
    ck.save_epoch(args, model, optimizer, scaler, epoch, epoch_step, {}, None, {}, teacher=teacher)


def test_a_checkpoint_holds_the_state_at_save_time_while_training_changes_it(tmp_path, gate):
    args, model, teacher, optimizer, scaler = training(tmp_path)
    expected = copy.deepcopy({"model": model.state_dict(), "model_ema": teacher.state_dict(),
                              "optimizer": optimizer.state_dict()})
    save(args, model, teacher, optimizer, scaler)
    train_step(model, optimizer)  # the write has not started: training goes on
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(0.5)
    assert not torch.equal(model.state_dict()["0.weight"], expected["model"]["0.weight"])
    gate.set()
    ckpt = ck.load_checkpoint(tmp_path / "checkpoint-last.pth")
    for key in expected:
        assert_same_state(ckpt[key], expected[key])


def test_a_background_save_writes_the_bytes_of_a_synchronous_save(tmp_path):
    _, model, _, optimizer, _ = training(tmp_path)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": [rng_state()], "epoch": 0,
             "args": {"model": "tiny", "lr": 0.1, "sizes": [1, 2]}, "log_record": {"epoch": 0, "train_loss": 0.5}}
    ck.write_atomically(tmp_path / "synchronous.pth", lambda f: torch.save(state, f))
    ck.save_in_background(state, tmp_path / "background.pth")
    ck.wait_for_saves()
    assert (tmp_path / "background.pth").read_bytes() == (tmp_path / "synchronous.pth").read_bytes()


def test_a_save_returns_while_its_write_is_in_flight(tmp_path, gate):
    args, model, teacher, optimizer, scaler = training(tmp_path)
    start = time.monotonic()
    save(args, model, teacher, optimizer, scaler)
    assert time.monotonic() - start < GATE_S / 2 and not (tmp_path / "checkpoint-last.pth").exists()
    gate.set()
    ck.wait_for_saves()
    assert ck.load_checkpoint(tmp_path / "checkpoint-last.pth")["epoch_step"] == 1


def test_the_next_save_waits_for_the_previous_write(tmp_path, monkeypatch):
    args, model, teacher, optimizer, scaler = training(tmp_path)
    events, write, written = [], ck.write_atomically, []

    def slow(path, fn):
        time.sleep(0.5)
        write(path, fn)
        written.append(path)
        events.append(f"step {len(written)} on disk")
    monkeypatch.setattr(ck, "write_atomically", slow)
    save(args, model, teacher, optimizer, scaler, epoch_step=1)
    events.append("step 1 saved")
    save(args, model, teacher, optimizer, scaler, epoch_step=2)
    events.append("step 2 saved")
    ck.wait_for_saves()
    assert events.index("step 1 on disk") < events.index("step 2 saved")
    assert events.index("step 1 on disk") < events.index("step 2 on disk")


class NoPreemption:
    stopping = False

    def ignore(self):
        pass


@pytest.mark.parametrize("where", ["next save", "wait_for_saves", "load_checkpoint", "end_run"])
def test_a_failed_background_write_stops_the_run_naming_the_file(tmp_path, where):
    args, model, teacher, optimizer, scaler = training(tmp_path)
    path = tmp_path / "checkpoint-last.pth"
    os.symlink("/dev/full", str(path) + ".tmp")  # every write into the temporary file fails with ENOSPC
    save(args, model, teacher, optimizer, scaler)  # returns: the write fails in the writer thread
    then = {"next save": lambda: save(args, model, teacher, optimizer, scaler, epoch_step=2),
            "wait_for_saves": ck.wait_for_saves, "load_checkpoint": lambda: ck.load_checkpoint(path),
            "end_run": lambda: end_run(None, time.time(), NoPreemption(), False)}[where]
    with pytest.raises(SystemExit, match=re.escape(f"could not write {path}: No space left on device (errno 28)")):
        then()
    assert not os.listdir(tmp_path)


def epoch_end(args, model, teacher, optimizer, scaler, epoch, is_best, log_writer=None):
    ck.save_epoch(args, model, optimizer, scaler, epoch, args.steps_per_epoch, None, log_writer, {"loss": 1.0},
                  {"acc1": 50.0}, teacher=teacher, best=dict(max_accuracy=50.0, best_epoch=epoch if is_best else None))


@pytest.mark.parametrize("links", [True, False], ids=["hard links", "no hard links"])
def test_numbered_and_best_checkpoints_are_the_last_ones_bytes_and_not_read_back(tmp_path, monkeypatch, links):
    args, model, teacher, optimizer, scaler = training(tmp_path)
    real_open = builtins.open

    def no_read_back(file, mode="r", *a, **kw):
        assert not (os.path.basename(os.fspath(file)) == "checkpoint-last.pth" and "r" in mode), "read back"
        return real_open(file, mode, *a, **kw)
    monkeypatch.setattr(builtins, "open", no_read_back)
    if not links:  # a file system without hard links (FAT, some FUSE mounts): written again from the snapshot
        def refused(*args):
            raise OSError(errno.EPERM, "Operation not permitted")
        monkeypatch.setattr(os, "link", refused)
    epoch_end(args, model, teacher, optimizer, scaler, 0, is_best=True)
    ck.wait_for_saves()
    monkeypatch.undo()
    last = (tmp_path / "checkpoint-last.pth").read_bytes()
    assert os.path.samefile(tmp_path / "checkpoint-0.pth", tmp_path / "checkpoint-last.pth") == links
    assert (tmp_path / "checkpoint-0.pth").read_bytes() == (tmp_path / "checkpoint-best.pth").read_bytes() == last
    train_step(model, optimizer)
    epoch_end(args, model, teacher, optimizer, scaler, 1, is_best=False)
    ck.wait_for_saves()
    assert (tmp_path / "checkpoint-best.pth").read_bytes() == (tmp_path / "checkpoint-0.pth").read_bytes() == last
    assert (tmp_path / "checkpoint-1.pth").read_bytes() == (tmp_path / "checkpoint-last.pth").read_bytes() != last


def test_a_killed_runs_leftover_link_does_not_change_the_checkpoint_it_names(tmp_path):
    """A kill between linking checkpoint-<epoch>.pth.tmp and renaming it leaves a second name of a checkpoint (kept
    where the output folder cannot be locked): writing into it would rewrite that checkpoint."""
    args, model, teacher, optimizer, scaler = training(tmp_path)
    epoch_end(args, model, teacher, optimizer, scaler, 0, is_best=False)
    ck.wait_for_saves()
    kept = (tmp_path / "checkpoint-0.pth").read_bytes()
    os.link(tmp_path / "checkpoint-0.pth", tmp_path / "checkpoint-1.pth.tmp")
    train_step(model, optimizer)
    epoch_end(args, model, teacher, optimizer, scaler, 1, is_best=False)
    ck.wait_for_saves()
    assert (tmp_path / "checkpoint-0.pth").read_bytes() == kept
    assert (tmp_path / "checkpoint-1.pth").read_bytes() == (tmp_path / "checkpoint-last.pth").read_bytes() != kept


def test_an_epochs_outputs_appear_in_the_order_a_restart_replays_them(tmp_path, monkeypatch):
    """checkpoint-last.pth, then checkpoint-best / -<epoch>, then the TensorBoard scalars, then the log line: a
    restart completes whatever a kill left out (util.checkpoint.finish_epoch)."""
    args, model, teacher, optimizer, scaler = training(tmp_path)
    events, write = [], ck.write_atomically

    def recorded(path, fn):
        write(path, fn)
        events.append(os.path.basename(path))
    monkeypatch.setattr(ck, "write_atomically", recorded)

    class LogWriter:
        def add_scalar(self, tag, value, step):
            events.append(tag)

        def flush(self):
            pass
    epoch_end(args, model, teacher, optimizer, scaler, 0, is_best=True, log_writer=LogWriter())
    ck.wait_for_saves()
    assert events == ["checkpoint-last.pth", "checkpoint-best.pth", "checkpoint-0.pth", "epoch/train_loss",
                      "perf/test_acc1", "epoch/epoch", "epoch/n_parameters", "log.txt"]
