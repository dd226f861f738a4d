"""Behaviour of util/: lr rules and schedule, checkpoints, cross-rank BatchNorm, launcher mapping, logging."""
import argparse
import builtins
import importlib
import math
import os
import pickle
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from unittest.mock import patch
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from runs import epoch_log
from util import dist as dist_util
from util.batchnorm import SyncBatchNorm1d, convert_sync_batchnorm
import util.checkpoint
from util.checkpoint import (UnreadableCheckpoint, find_resume_checkpoint, load_checkpoint, load_training_state,
                             normalize_pretrained, read_run_checkpoint, replay_killed_epoch, save_epoch, wait_for_saves,
                             write_atomically)
from util.logging import MetricLogger, NonFiniteLossError
from util.lr_sched import adjust_learning_rate, effective_lr
from util.rng import rng_state, set_rng_state
from util.run import check_run_args

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- learning rate

def _schedule_args(**kw):
    return argparse.Namespace(**{"lr": 1.0, "min_lr": 0.1, "warmup_epochs": 4, "epochs": 10, **kw})


def _optimizer(*lr_scales):
    groups = [{"params": [nn.Parameter(torch.zeros(1))], "lr_scale": s} for s in lr_scales]
    return torch.optim.SGD(groups or [nn.Parameter(torch.zeros(1))], lr=0.0)


@pytest.mark.parametrize("epoch, expected", [
    (0.0, 0.0),  # warm-up starts from 0
    (1.0, 0.25),  # linear during warm-up
    (2.0, 0.5),
    (4.0, 1.0),  # peak at the end of warm-up
    (7.0, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))),  # half-way through the cosine
    (10.0, 0.1),  # min_lr at the end of the schedule
])
def test_lr_schedule_warms_up_linearly_then_follows_half_cosine(epoch, expected):
    optimizer = _optimizer()
    lr = adjust_learning_rate(optimizer, epoch, _schedule_args())
    assert lr == expected
    assert optimizer.param_groups[0]["lr"] == expected


def test_lr_schedule_is_monotone_per_iteration_and_ends_at_min_lr():
    args = _schedule_args(min_lr=0.0)
    lrs = [adjust_learning_rate(_optimizer(), step / 100, args) for step in range(1001)]
    assert lrs[0] == 0.0 and lrs[400] == 1.0 and lrs[-1] == 0.0
    assert all(a < b for a, b in zip(lrs[:400], lrs[1:401]))
    assert all(a > b for a, b in zip(lrs[400:], lrs[401:]))


def test_lr_schedule_applies_param_group_lr_scale():
    optimizer = _optimizer(1.0, 0.5, 0.25)
    lr = adjust_learning_rate(optimizer, 4.0, _schedule_args(lr=2.0))
    assert lr == 2.0
    assert [g["lr"] for g in optimizer.param_groups] == [2.0, 1.0, 0.5]


@pytest.mark.parametrize("rule", ["sqrt", "linear"])
def test_sqrt_and_linear_lr_rules_agree_at_batch_4096_for_pretraining(rule):
    args = argparse.Namespace(lr=None, blr=1.5e-4, lr_scale=rule)
    assert effective_lr(args, 4096) == pytest.approx(1.5e-4 * 64 / 4, rel=1e-12)
    assert effective_lr(args, 4096) == pytest.approx(2.4e-3, rel=1e-12)


@pytest.mark.parametrize("rule", ["sqrt", "linear"])
def test_sqrt_and_linear_lr_rules_agree_at_batch_1024_for_finetuning(rule):
    args = argparse.Namespace(lr=None, blr=1e-3, lr_scale=rule)
    assert effective_lr(args, 1024, divisor=8) == pytest.approx(4e-3, rel=1e-12)


def test_lr_rules_differ_away_from_the_reference_batch():
    sqrt = effective_lr(argparse.Namespace(lr=None, blr=1.5e-4, lr_scale="sqrt"), 256)
    linear = effective_lr(argparse.Namespace(lr=None, blr=1.5e-4, lr_scale="linear"), 256)
    assert sqrt == pytest.approx(1.5e-4 * 16 / 4) and linear == pytest.approx(1.5e-4)


# ---------------------------------------------------------------- checkpoints

class NotAWeight:
    """A custom class: unpickling it would mean importing and running arbitrary code."""


def test_checkpoint_roundtrip_loads_with_weights_only(tmp_path):
    state = {"model": {"w": torch.arange(6.0).view(2, 3)}, "epoch": 3, "args": {"lr": 1e-3, "name": "lut"}}
    write_atomically(tmp_path / "checkpoint-last.pth", lambda f: torch.save(state, f))
    loaded = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["epoch"] == 3 and loaded["args"] == {"lr": 1e-3, "name": "lut"}
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-last.pth"]


def test_checkpoint_killed_mid_save_leaves_previous_file_loadable(tmp_path):
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"epoch": 1, "w": torch.arange(4.0)}, path)
    # The child writes a 64 MB checkpoint and stalls before the rename (a slow disk): SIGKILL it mid-save.
    child = textwrap.dedent(f"""
        import os, time, torch
        from util.checkpoint import write_atomically
        os.fsync = lambda fd: time.sleep(600)
        write_atomically({str(path)!r}, lambda f: torch.save({{"epoch": 2, "w": torch.zeros(16, 2**20)}}, f))
    """)
    before = path.stat()

    def writing_started():  # a new file in the directory, or the checkpoint itself touched
        now = path.stat()
        return (now.st_ino, now.st_size) != (before.st_ino, before.st_size) or any(
            p != path and p.stat().st_size > 0 for p in tmp_path.iterdir())

    proc = subprocess.Popen([sys.executable, "-c", child], cwd=REPO)
    deadline = time.time() + 30
    while not writing_started():
        assert proc.poll() is None, "the child exited before it started writing"
        assert time.time() < deadline, "the child never started writing"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 1 and torch.equal(loaded["w"], torch.arange(4.0))
    # The next save overwrites the leftover partial file.
    write_atomically(path, lambda f: torch.save({"epoch": 3}, f))
    assert load_checkpoint(path) == {"epoch": 3}
    assert os.listdir(tmp_path) == ["checkpoint-last.pth"]


def test_a_save_on_a_full_disk_names_the_file_and_cause_and_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"epoch": 1}, path)
    os.symlink("/dev/full", str(path) + ".tmp")  # every write into the temporary file fails with ENOSPC
    with pytest.raises(SystemExit, match=re.escape(f"could not write {path}: No space left on device (errno 28); "
                                                   f"the previous file there is untouched")):
        write_atomically(path, lambda f: torch.save({"epoch": 2, "w": torch.zeros(2 ** 20)}, f))
    assert load_checkpoint(path) == {"epoch": 1} and os.listdir(tmp_path) == ["checkpoint-last.pth"]


def test_checkpoint_with_namespace_args_loads_with_weights_only(tmp_path):
    # The LUT authors' checkpoints store args as an argparse.Namespace.
    args = argparse.Namespace(model="lut_vit_base_patch16", blr=1.5e-4, input_size=224)
    torch.save({"model": {"w": torch.ones(2)}, "args": args, "epoch": 1599}, tmp_path / "authors.pth")
    loaded = load_checkpoint(tmp_path / "authors.pth")
    assert loaded["args"] == args and loaded["epoch"] == 1599


def test_checkpoint_needing_unsafe_unpickling_is_refused(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"model": {"w": torch.ones(2)}, "extra": NotAWeight()}, path)
    with pytest.raises(pickle.UnpicklingError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert str(path) in message and "unsafe unpickling" in message and "refused" in message
    assert "NotAWeight" in message


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_a_damaged_checkpoint_is_a_one_line_error_naming_the_file(tmp_path, damage):
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"w": torch.zeros(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-1000] if damage == "truncated" else data[:100] + bytes(len(data) - 100))
    with pytest.raises(SystemExit) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert message.startswith(f"checkpoint {path} cannot be read") and "truncated or corrupt" in message
    assert "\n" not in message


def test_a_damaged_resume_file_inside_the_run_folder_is_refused_and_left_as_it_is(tmp_path):
    torch.save({"epoch": 9}, tmp_path / "checkpoint-9.pth")
    resume = tmp_path / "checkpoint-4.pth"
    resume.write_bytes(b"not a checkpoint")
    with pytest.raises(UnreadableCheckpoint, match=f"checkpoint {resume} cannot be read"):
        read_run_checkpoint(resume, tmp_path)
    assert resume.read_bytes() == b"not a checkpoint" and not (tmp_path / "checkpoint-4.pth.damaged").exists()


def test_a_damaged_checkpoint_last_keeps_every_earlier_damaged_copy(tmp_path, capsys):
    last = tmp_path / "checkpoint-last.pth"
    torch.save({"epoch": 2}, tmp_path / "checkpoint-previous.pth")
    (tmp_path / "checkpoint-last.pth.damaged").write_bytes(b"damaged the first time")
    last.write_bytes(b"damaged again")
    assert read_run_checkpoint(last, tmp_path) == {"epoch": 2}
    assert load_checkpoint(last) == {"epoch": 2}
    assert (tmp_path / "checkpoint-last.pth.damaged").read_bytes() == b"damaged the first time"
    assert (tmp_path / "checkpoint-last.pth.damaged.1").read_bytes() == b"damaged again"
    assert f"continuing from the newest readable checkpoint of the run, {tmp_path / 'checkpoint-previous.pth'}" in \
        capsys.readouterr().out


def test_a_restart_continues_from_this_runs_checkpoint_not_from_resume(tmp_path, capsys):
    explicit, last = tmp_path / "old.pth", tmp_path / "checkpoint-last.pth"
    torch.save({"epoch": 0}, explicit)
    assert find_resume_checkpoint(str(tmp_path), str(explicit), auto_resume=True) == str(explicit)  # the first run
    torch.save({"epoch": 1}, last)  # ... has written its own checkpoint and is requeued with the same arguments
    assert find_resume_checkpoint(str(tmp_path), str(explicit), auto_resume=True) == str(last)
    assert f"not from --resume {explicit}" in capsys.readouterr().out
    assert find_resume_checkpoint(str(tmp_path), "", auto_resume=True) == str(last)
    assert find_resume_checkpoint(str(tmp_path), str(explicit), auto_resume=False) == str(explicit)
    assert find_resume_checkpoint(str(tmp_path), "", auto_resume=False) is None


def _weights(prefix=""):
    return {f"{prefix}cls_token": torch.zeros(1, 1, 4), f"{prefix}blocks.0.attn.qkv.weight": torch.ones(12, 4)}


@pytest.mark.parametrize("ckpt, key", [
    ({"model": _weights(), "model_ema": _weights(), "optimizer": {}, "epoch": 5, "args": {}}, "model"),  # ours
    ({"model": _weights(), "model_ema": _weights(), "optimizer": {}, "epoch": 5, "args": {}}, "model_ema"),
    ({"model": _weights(), "model_ema": _weights("ema."), "args": argparse.Namespace()}, "model_ema"),  # authors'
    ({"model": _weights("module.")}, "model"),  # MAE release / a DDP-wrapped save
])
def test_normalize_pretrained_gives_plain_encoder_keys(ckpt, key):
    state = normalize_pretrained(ckpt, key)
    assert list(state) == ["cls_token", "blocks.0.attn.qkv.weight"]
    assert torch.equal(state["blocks.0.attn.qkv.weight"], torch.ones(12, 4))


def test_normalize_pretrained_names_available_keys_when_key_is_missing():
    with pytest.raises(KeyError, match="model_ema.*'model'"):
        normalize_pretrained({"model": _weights()}, "model_ema")


def _draw():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def _rng_worker(rank, world_size, port, out_dir):
    """One rank of a gloo job: save a training state, draw, load it back, draw again."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    args = argparse.Namespace(device="cpu", model="linear", steps_per_epoch=4, batch_size=2, accum_iter=1, seed=0,
                              output_dir=out_dir)
    dist_util.init_distributed(args)
    model, path = nn.Linear(2, 1), os.path.join(out_dir, "checkpoint-last.pth")
    optimizer, scaler = torch.optim.SGD(model.parameters(), lr=0.1), torch.amp.GradScaler("cpu", enabled=False)
    torch.manual_seed(rank), np.random.seed(rank), random.seed(rank)  # each rank its own streams, as in training
    save_epoch(args, model, optimizer, scaler, 0, 2, {}, None, {})
    expected = _draw()
    _draw()
    load_training_state(path, args, model, optimizer, scaler)
    torch.save({"expected": expected, "resumed": _draw()}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist_util.destroy_distributed()


def test_each_rank_resumes_its_own_random_streams(tmp_path):
    mp.spawn(_rng_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(r["resumed"] == r["expected"] for r in ranks)
    assert ranks[0]["expected"] != ranks[1]["expected"]


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path):
    torch.save({"rng": rng_state()}, tmp_path / "ckpt.pth")
    expected = _draw()
    _draw()
    set_rng_state(load_checkpoint(tmp_path / "ckpt.pth")["rng"])
    assert _draw() == expected


# ---------------------------------------------------------------- cross-rank BatchNorm

def _bn_pair(shape_c=6, momentum=0.1):
    torch.manual_seed(0)
    ref = nn.BatchNorm1d(shape_c, momentum=momentum)
    nn.init.normal_(ref.weight)
    nn.init.normal_(ref.bias)
    ours = SyncBatchNorm1d(shape_c, momentum=momentum)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("shape", [(8, 6), (8, 6, 5)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_sync_batchnorm_equals_batchnorm1d_in_one_process(shape, momentum):
    ref, ours = _bn_pair(momentum=momentum)
    for step in range(3):
        x = torch.randn(shape) * 3 + step
        x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
        g = torch.randn(shape)
        y_ref, y_ours = ref(x_ref), ours(x_ours)
        (y_ref * g).sum().backward()
        (y_ours * g).sum().backward()
        assert torch.equal(y_ref, y_ours) and torch.equal(x_ref.grad, x_ours.grad)
    assert torch.equal(ref.weight.grad, ours.weight.grad) and torch.equal(ref.bias.grad, ours.bias.grad)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, ours.state_dict()[k]), k
    ref.eval(), ours.eval()
    x = torch.randn(shape)
    assert torch.equal(ref(x), ours(x))


def test_convert_sync_batchnorm_keeps_keys_parameters_and_buffers():
    head = nn.Sequential(nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4, bias=False))
    head(torch.randn(5, 4))  # non-trivial running stats
    head.eval()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    weight = head[1].weight
    model = nn.ModuleDict({"projector": head})
    converted = convert_sync_batchnorm(model)
    assert type(converted["projector"][1]) is SyncBatchNorm1d
    assert converted["projector"][1].weight is weight  # an optimizer built earlier still trains it
    assert not converted["projector"][1].training
    after = converted.state_dict()
    assert list(after) == ["projector." + k for k in before]
    assert all(torch.equal(before[k], after["projector." + k]) for k in before)


def _head(c_in, three_d, bn):
    """Linear (a 1x1 Conv1d for [N, C, L]) then BatchNorm, like the LUT projector's first two layers."""
    torch.manual_seed(0)
    first = nn.Conv1d(c_in, 4, 1, bias=False) if three_d else nn.Linear(c_in, 4, bias=False)
    model = nn.Sequential(first, bn(4))
    nn.init.normal_(model[1].weight)
    nn.init.normal_(model[1].bias)
    return model


def _train_steps(model, xs, gs):
    """One backward of mean(model(x) * g) per batch (the mean over this process's samples); grads accumulate."""
    ys, x_grads = [], []
    for x, g in zip(xs, gs):
        x = x.clone().requires_grad_()
        y = model(x)
        (y * g).mean().backward()
        ys.append(y.detach())
        x_grads.append(x.grad)
    return ys, x_grads


def _sync_bn_worker(rank, world_size, port, cases, out_dir):
    """One rank of a gloo job: the same steps as one process on the full batches, on this rank's share of each."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    args = argparse.Namespace(device="cpu")
    dist_util.init_distributed(args)
    results = {"layout": (args.rank, args.world_size, args.distributed),
               "mean_of_ranks": dist_util.all_reduce_mean(float(rank))}
    for name, (x, g) in cases.items():
        model = DistributedDataParallel(_head(x.shape[2], x.dim() == 4, SyncBatchNorm1d))  # averages gradients
        share = slice(rank * x.shape[1] // world_size, (rank + 1) * x.shape[1] // world_size)
        ys, x_grads = _train_steps(model, x[:, share], g[:, share])
        model = model.module.eval()
        results[name] = {"ys": ys, "x_grads": x_grads, "grads": [p.grad for p in model.parameters()],
                         "state": model.state_dict(), "y_eval": model(x[0, share]).detach()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist_util.destroy_distributed()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sync_batchnorm_two_ranks_with_half_batches_equal_one_rank_with_full_batch(tmp_path):
    torch.manual_seed(1)
    world, b, steps = 2, 8, 2
    cases = {"[N, C]": (torch.randn(steps, b, 6) * 2 + 1, torch.randn(steps, b, 4)),
             "[N, C, L]": (torch.randn(steps, b, 6, 3) - 1, torch.randn(steps, b, 4, 3))}
    mp.spawn(_sync_bn_worker, args=(world, _free_port(), cases, str(tmp_path)), nprocs=world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    assert [r["layout"] for r in ranks] == [(0, 2, True), (1, 2, True)]
    assert [r["mean_of_ranks"] for r in ranks] == [0.5, 0.5]
    close = lambda got, want: torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # noqa: E731
    for name, (x, g) in cases.items():
        ref = _head(x.shape[2], x.dim() == 4, nn.BatchNorm1d)
        ys, x_grads = _train_steps(ref, x, g)
        ref.eval()
        y_eval = ref(x[0]).detach()
        for r, res in enumerate(ranks):
            share = slice(r * b // world, (r + 1) * b // world)
            for step in range(steps):
                close(res[name]["ys"][step], ys[step][share])
                # As with torch's SyncBatchNorm, a rank's input gradient is that of the sum of the ranks' losses.
                close(res[name]["x_grads"][step], world * x_grads[step][share])
            for got, p in zip(res[name]["grads"], ref.parameters()):
                close(got, p.grad)
            for k, v in ref.state_dict().items():  # running mean, unbiased running var, num_batches_tracked
                close(res[name]["state"][k], v)
            close(res[name]["y_eval"], y_eval[share])


def _ddp_worker(rank, world_size, port, out_dir):
    """Three SGD steps of a small MLP under DDP on this rank's half of each batch: as util.dist.wrap_ddp wraps it
    (gradients as bucket views), with --ddp_bf16_grads, and as plain DDP (its own gradient tensors)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist_util.init_distributed(argparse.Namespace(device="cpu"))
    results = {}
    for name in ("wrap_ddp", "bf16_grads", "plain"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 4))
        if name == "plain":
            ddp = DistributedDataParallel(model)
        else:
            ddp = dist_util.wrap_ddp(model, argparse.Namespace(distributed=True, ddp_bf16_grads=name == "bf16_grads"),
                                     torch.device("cpu"))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        generator = torch.Generator().manual_seed(rank)
        for _ in range(3):
            ddp(torch.randn(8, 6, generator=generator)).square().mean().backward()
            storages = {p.grad.untyped_storage().data_ptr() for p in model.parameters()}
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        results[name] = {"state": model.state_dict(), "grad_storages": len(storages)}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist_util.destroy_distributed()


def test_ddp_gradients_are_bucket_views_with_the_same_result_and_bf16_all_reduce_is_opt_in(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for res in ranks:
        assert res["wrap_ddp"]["grad_storages"] == 1  # the 4 gradients share DDP's one bucket
        assert res["plain"]["grad_storages"] == 4
        for k, v in res["plain"]["state"].items():
            assert torch.equal(res["wrap_ddp"]["state"][k], v), k  # bucket views change no number
            torch.testing.assert_close(res["bf16_grads"]["state"][k], v, rtol=1e-2, atol=1e-3)
        assert any(not torch.equal(res["bf16_grads"]["state"][k], v) for k, v in res["plain"]["state"].items())
    assert all(torch.equal(ranks[0]["bf16_grads"]["state"][k], v) for k, v in ranks[1]["bf16_grads"]["state"].items())


# ---------------------------------------------------------------- CPU cores and DataLoader workers

@pytest.mark.parametrize("environ, affinity, cores", [
    ({}, 16, 16),  # one process: every core it may run on
    ({"LOCAL_WORLD_SIZE": "8"}, 96, 12),  # torchrun: 8 local ranks share the launcher's cores
    ({"LOCAL_WORLD_SIZE": "8"}, 4, 1),
    ({"SLURM_STEP_ID": "0", "SLURM_CPUS_PER_TASK": "10"}, 10, 10),  # srun binds each task to its cores
    ({"SLURM_STEP_ID": "0", "SLURM_CPUS_PER_TASK": "10"}, 80, 10),  # srun without binding: the node's cores
    ({"SLURM_CPUS_PER_TASK": "10"}, 80, 80),  # the batch script itself, outside srun
])
def test_cpu_cores_per_rank_come_from_the_affinity_the_local_ranks_and_slurm(monkeypatch, environ, affinity, cores):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))
    assert dist_util.cpu_cores_per_rank(environ) == cores


def test_default_workers_leave_cores_to_the_main_process_and_say_so(monkeypatch, capsys):
    monkeypatch.setattr(builtins, "print", builtins.print)  # set_num_workers prints through the rank-0 print
    assert [dist_util.default_num_workers(c) for c in (1, 2, 3, 10, 12)] == [1, 1, 1, 8, 10]
    import util.run
    monkeypatch.setattr(util.run, "cpu_cores_per_rank", lambda: 10)
    args = argparse.Namespace(num_workers=None)
    util.run.set_num_workers(args)
    assert args.num_workers == 8 and "10 CPU cores per rank, 8 DataLoader workers per rank" in capsys.readouterr().out
    util.run.set_num_workers(args := argparse.Namespace(num_workers=10))
    out = capsys.readouterr().out
    assert args.num_workers == 10 and "WARNING: --num_workers 10 and the main process share 10 CPU cores: use " \
        "--num_workers 8" in out
    util.run.set_num_workers(argparse.Namespace(num_workers=9))  # 9 workers and the main process fit 10 cores
    assert "WARNING" not in capsys.readouterr().out


def test_cpus_per_task_default_is_the_smallest_node_of_the_partition_over_its_gpus(monkeypatch):
    submit = pytest.importorskip("util.submit")
    calls = []

    def sinfo(cmd, **kwargs):
        calls.append(cmd)
        rows = ["96 gpu*", "128+ gpu*", "16 cpu"]  # sinfo --format="%c %P": one row per node group
        if "--partition" in cmd:
            rows = [row for row in rows if row.split()[1].rstrip("*") == cmd[cmd.index("--partition") + 1]]
        return subprocess.CompletedProcess(cmd, 0, stdout="".join(row + "\n" for row in rows))
    monkeypatch.setattr(subprocess, "run", sinfo)
    assert submit.partition_cpus_per_task(None, 8) == 12  # the default partition (gpu*): min(96, 128) // 8
    assert submit.partition_cpus_per_task("cpu", 4) == 4 and calls[-1][-2:] == ["--partition", "cpu"]

    def missing(cmd, **kwargs):
        raise FileNotFoundError("sinfo")
    monkeypatch.setattr(subprocess, "run", missing)
    assert submit.partition_cpus_per_task(None, 8) is None


# ---------------------------------------------------------------- launcher mapping

def test_slurm_srun_variables_map_to_rank_world_size_and_local_rank():
    seen = []
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_ID": "0"}
    layout = dist_util.launcher_env(env, first_host=lambda nodelist: seen.append(nodelist) or "gpu07")
    assert seen == ["gpu[07-08]"]
    assert layout == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                      "MASTER_PORT": str(20000 + 123456 % 20000)}


def test_slurm_mapping_keeps_master_address_and_port_from_the_environment():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "n1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "SLURM_STEP_ID": "0"}
    layout = dist_util.launcher_env(env, first_host=lambda nodelist: pytest.fail("scontrol must not be called"))
    assert (layout["MASTER_ADDR"], layout["MASTER_PORT"]) == ("10.0.0.1", "29500")


def test_a_batch_script_process_outside_srun_runs_alone_and_says_why(monkeypatch, capsys):
    for var in ("RANK", "WORLD_SIZE", "SLURM_STEP_ID"):
        monkeypatch.delenv(var, raising=False)
    for var, value in {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "7",
                       "SLURM_JOB_NODELIST": "n1"}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(builtins, "print", builtins.print)  # init_distributed wraps print
    args = argparse.Namespace(device="cpu")
    dist_util.init_distributed(args)
    assert (args.rank, args.world_size, args.distributed) == (0, 1, False)
    assert "8 tasks, but this process was not started by srun: running as one process" in capsys.readouterr().out


def test_a_rank_whose_peers_never_join_stops_after_dist_timeout(monkeypatch, capsys):
    monkeypatch.setattr(builtins, "print", builtins.print)
    for var, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(var, value)
    start = time.time()
    with pytest.raises(SystemExit, match=r"rank 0: not all 2 ranks joined at 127.0.0.1:\d+ within 0:00:03"):
        dist_util.init_distributed(argparse.Namespace(device="cpu", dist_timeout=0.05))
    assert time.time() - start < 30
    assert re.search(r"rank 0 of 2 \(.+, local rank 0\) joining the process group at 127.0.0.1:\d+",
                     capsys.readouterr().out)


def test_several_processes_without_cuda_need_device_cpu_and_maes_launcher_flags_are_checked(monkeypatch):
    for var, value in dict(RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(var, value)
    parser = importlib.import_module("main_pretrain").get_args_parser()
    args = parser.parse_args(["--data_path", "x", "--local-rank=1", "--dist_url", "env://"])
    assert args.local_rank == 1
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="2 processes but CUDA is not usable here .* pass --device cpu"):
            check_run_args(args)
    with pytest.raises(SystemExit, match="--world_size 4 but the launcher started 2 process"):
        dist_util.init_distributed(parser.parse_args(["--data_path", "x", "--world_size", "4", "--device", "cpu"]))


def test_torchrun_variables_win_inside_a_slurm_allocation():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "MASTER_ADDR": "h", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}
    assert dist_util.launcher_env(env) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "MASTER_ADDR": "h",
                                           "MASTER_PORT": "1234"}


def test_plain_process_is_not_distributed(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(builtins, "print", builtins.print)  # init_distributed wraps print
    args = argparse.Namespace(device="cpu")
    dist_util.init_distributed(args)
    assert (args.rank, args.world_size, args.gpu, args.distributed) == (0, 1, 0, False)
    assert dist_util.local_device(args) == torch.device("cpu")
    assert dist_util.all_reduce_mean(2.5) == 2.5


def placement(env, visible_gpus):
    """(rank, local rank, world size, master address, CUDA device index) of the process started with `env`."""
    layout = dist_util.launcher_env(env, first_host=lambda nodelist: "gpu07")
    local_rank = int(layout["LOCAL_RANK"])
    return (int(layout["RANK"]), local_rank, int(layout["WORLD_SIZE"]), layout["MASTER_ADDR"],
            dist_util.cuda_index(local_rank, visible_gpus))


def test_torchrun_on_two_nodes_of_four_gpus_places_rank_r_on_gpu_r_mod_4():
    for rank in range(8):
        env = dict(RANK=str(rank), LOCAL_RANK=str(rank % 4), WORLD_SIZE="8", GROUP_RANK=str(rank // 4),
                   LOCAL_WORLD_SIZE="4", MASTER_ADDR="gpu07", MASTER_PORT="29500")
        assert placement(env, visible_gpus=4) == (rank, rank % 4, 8, "gpu07", rank % 4)


def slurm_task_env(monkeypatch, rank):
    """The environment of task `rank` of a 2-node x 4-task SLURM job once submitit's TorchDistributedEnvironment
    has exported it, as util.submit.Trainer does."""
    submitit = pytest.importorskip("submitit")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        # setenv first: monkeypatch then restores what export() sets (delenv of an unset variable records nothing)
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    for var, value in dict(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[07-08]",
                           SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="8", SLURM_STEP_ID="0", SLURM_PROCID=str(rank),
                           SLURM_LOCALID=str(rank % 4), SLURM_NODEID=str(rank // 4)).items():
        monkeypatch.setenv(var, value)
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return dict(os.environ)


def test_a_two_node_slurm_job_as_submitit_sets_it_places_each_task_on_its_nodes_gpu(monkeypatch):
    for rank in range(8):
        env = slurm_task_env(monkeypatch, rank)
        assert placement(env, visible_gpus=4) == (rank, rank % 4, 8, "gpu07", rank % 4)
        # srun without submitit's variables maps SLURM's own the same way
        bare = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
        assert placement(bare, visible_gpus=4) == (rank, rank % 4, 8, "gpu07", rank % 4)


def test_a_task_that_sees_only_its_own_gpu_uses_cuda_0_whatever_its_local_rank(monkeypatch):
    # srun --gpus-per-task=1: SLURM_LOCALID is 0..3 but CUDA_VISIBLE_DEVICES holds one GPU per task.
    for rank in range(8):
        assert placement(slurm_task_env(monkeypatch, rank), visible_gpus=1) == (rank, rank % 4, 8, "gpu07", 0)


def test_more_processes_per_node_than_visible_gpus_is_refused_in_one_line():
    with pytest.raises(SystemExit, match="local rank 3 but this process sees 2 CUDA devices .*at most 2 processes"):
        dist_util.cuda_index(3, 2)


# ---------------------------------------------------------------- logging

def test_metric_logger_prints_window_and_global_means(capsys):
    logger = MetricLogger(header="Epoch [0]", print_freq=2)
    for i in logger.log_every(range(5), images_per_iter=64):
        logger.update(loss=torch.tensor(float(i)), acc=float(10 * i))
        logger.set(lr=0.0024)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0] for line in lines[:3]] == ["Epoch [0] [2/5]", "Epoch [0] [4/5]", "Epoch [0] [5/5]"]
    assert "loss 0.5000 (0.5000)" in lines[0] and "loss 2.5000 (1.5000)" in lines[1]
    assert "loss 4.0000 (2.0000)" in lines[2] and "acc 40.0000 (20.0000)" in lines[2]
    assert all(f in lines[0] for f in ("eta 0:00:00", "lr 0.0024", "img/s ", "time ", "data ", "mem "))
    assert lines[3].startswith("Epoch [0] total time")
    assert logger.summary() == {"loss": 2.0, "acc": 20.0, "lr": 0.0024}


def test_metric_logger_counts_from_the_resume_iteration(capsys):
    logger = MetricLogger(header="Epoch [3]", print_freq=4, total_iters=10)
    for _ in logger.log_every(range(4), start_iter=6):
        logger.update(loss=1.0)
    assert [line.split("  ")[0] for line in capsys.readouterr().out.splitlines()[:2]] == \
        ["Epoch [3] [ 8/10]", "Epoch [3] [10/10]"]


def test_metric_logger_totals_carry_an_epoch_across_a_resume(capsys):
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0]
    first = MetricLogger(print_freq=2, total_iters=7)
    for i in first.log_every(range(3)):  # stopped after 3 of 7 iterations
        first.update(loss=torch.tensor(values[i]))
    saved = first.totals()
    assert saved == {"sum": {"loss": 8.0}, "count": {"loss": 3}}
    second = MetricLogger(print_freq=2, total_iters=7, totals=saved)
    for i in second.log_every(range(3, 7), start_iter=3):
        second.update(loss=torch.tensor(values[i]))
    assert second.summary()["loss"] == pytest.approx(sum(values) / 7, rel=1e-12)
    assert f"({sum(values) / 7:.4f})" in capsys.readouterr().out.splitlines()[-2]  # the whole epoch's mean


def test_metric_logger_stops_on_a_non_finite_window_naming_the_iterations(capsys):
    logger = MetricLogger(header="Epoch [2]", print_freq=3)
    with pytest.raises(NonFiniteLossError, match=r"Epoch \[2\]: non-finite loss in the iterations up to 6 "
                                                 r"\(loss inf, mim 0\.5\)"):
        for i in logger.log_every(range(9)):
            logger.update(loss=torch.tensor(float("inf") if i == 4 else 1.0), mim=torch.tensor(0.5))
    assert capsys.readouterr().out.count("Epoch [2] [3/9]") == 1  # the first window was printed


class Scalars:
    def __init__(self):
        self.logged = []

    def add_scalar(self, tag, value, step):
        self.logged.append((tag, value, step))


def test_metric_logger_logs_window_means_against_epoch_1000x():
    writer = Scalars()
    logger = MetricLogger(print_freq=2, total_iters=4, epoch=3, log_writer=writer, tb_prefix="train_")
    for i in logger.log_every(range(4)):
        logger.update(loss=torch.tensor(float(i)))
        logger.set(lr=0.1 * i)
    assert writer.logged == [("train_loss", 0.5, 3500), ("lr", 0.1, 3500),
                             ("train_loss", 2.5, 4000), ("lr", pytest.approx(0.3), 4000)]


# ---------------------------------------------------------------- run flags and epoch outputs

@pytest.mark.parametrize("script", ["main_pretrain", "main_finetune", "main_linprobe", "main_knn"])
@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    (["--print_freq", "0"], "--print_freq must be at least 1, got 0"),
    (["--save_freq", "0"], "--save_freq must be at least 1, got 0"),
    (["--warmup_epochs", "-1"], "--warmup_epochs must not be negative, got -1"),
    (["--resume", "."], "--resume . is not a checkpoint file"),
    (["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs CUDA"),
])
def test_bad_run_flags_are_refused_before_anything_is_built(script, flags, message):
    parser = importlib.import_module(script).get_args_parser()
    known = {a for action in parser._actions for a in action.option_strings}
    if flags[0] not in known:
        pytest.skip(f"{script} has no {flags[0]}")
    args = parser.parse_args(["--data_path", "x", "--device", "cpu", *flags])
    with pytest.raises(SystemExit, match=re.escape(message)):
        check_run_args(args)


def test_epoch_outputs_of_a_run_killed_after_checkpoint_last_are_completed_once(tmp_path):
    args = argparse.Namespace(output_dir=str(tmp_path), log_dir=None, steps_per_epoch=2, epochs=4, save_freq=2,
                              model="linear")
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    save_epoch(args, model, optimizer, scaler, 0, 2, None, None, {"loss": 1.0}, {"acc1": 50.0},
               best=dict(max_accuracy=50.0, best_epoch=0))
    wait_for_saves()  # epoch 0's outputs are complete
    with torch.no_grad():
        model.weight.add_(1.0)
    # Epoch 1 is the best and a --save_freq epoch; the run dies right after writing its checkpoint-last.pth.
    record = {"train_loss": 0.5, "test_acc1": 60.0, "epoch": 1, "n_parameters": 3}
    with patch.object(util.checkpoint, "finish_epoch", lambda *args, **kwargs: None):  # the kill
        save_epoch(args, model, optimizer, scaler, 1, 2, None, None, {"loss": 0.5}, {"acc1": 60.0},
                   best=dict(max_accuracy=60.0, best_epoch=1))
        wait_for_saves()  # the background write
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-best.pth", "checkpoint-last.pth", "checkpoint-previous.pth",
                                            "log.txt"]
    for _ in range(2):  # the restart completes the epoch's outputs, and a second restart changes nothing
        last = tmp_path / "checkpoint-last.pth"
        replay_killed_epoch(args, str(last), load_checkpoint(last), None)
    assert [r["epoch"] for r in epoch_log(tmp_path)] == [0, 1] and epoch_log(tmp_path)[1] == record
    for name in ("checkpoint-1.pth", "checkpoint-best.pth"):
        assert torch.equal(load_checkpoint(tmp_path / name)["model"]["weight"], model.weight)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_checkpoint_in_the_authors_layout_resumes(tmp_path):
    """Their teacher keys carry an 'ema.' prefix, their args are a Namespace, one process's RNG state is a dict."""
    model, teacher = nn.Linear(2, 1), nn.Linear(2, 1)
    optimizer, scaler = torch.optim.SGD(model.parameters(), lr=0.1), torch.amp.GradScaler("cpu", enabled=False)
    torch.manual_seed(3)
    state = rng_state()
    expected = _draw()
    torch.save({"model": model.state_dict(), "model_ema": {f"ema.{k}": v + 1 for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "epoch": 4, "rng": state,
                "args": argparse.Namespace(model="linear")}, tmp_path / "authors.pth")
    args = argparse.Namespace(model="linear", steps_per_epoch=10, world_size=1, rank=0, seed=0)
    assert load_training_state(tmp_path / "authors.pth", args, model, optimizer, scaler, teacher)[:2] == (5, 0)
    assert _draw() == expected
    torch.testing.assert_close(teacher.weight, model.weight + 1)


def test_a_preemption_signal_after_a_completed_run_does_not_kill_the_exiting_process():
    # SLURM's time-limit signal can land while a finished run's interpreter shuts down, when Python has reset its
    # handlers to the default action (terminate): srun then reports the signal and the job ends FAILED. A shell loop
    # signals the process without pause from before end_run until it is gone.
    script = textwrap.dedent("""
        import os, subprocess, time
        from util.preemption import PreemptionHandler
        from util.run import end_run
        preemption = PreemptionHandler()
        subprocess.Popen(["sh", "-c", f"while kill -USR2 {os.getpid()}; do :; done"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # ends once this process is reaped
        time.sleep(0.3)
        end_run(None, time.time(), preemption, False)
    """)
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
