"""No host syncs per training step: the ops that make a GPU's host wait (tests/syncs.py), counted on the CPU over
whole pre-training runs of one and two gloo ranks; the compiled step, and the heads' cross-rank BatchNorm across two
ranks, traced without graph breaks."""
import argparse
import collections
import copy
import json
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch._dynamo.utils import counters

from engine_pretrain import TrainingForward, pretrain_step
from models_lut import LUT, MaskedAutoencoderViT
from runs import MICRO_PRETRAIN, TORCHRUN, run
from syncs import SyncCounter
from util.batchnorm import SyncBatchNorm1d
from util.dist import destroy_distributed, init_distributed

# Two epochs of 4 optimizer steps, a print interval longer than an epoch: a sync of the step would occur 8 times (16
# with accumulation), a sync of the epoch (the loader's seed, the epoch means, the unreadable-image count) twice, one
# of the run's start (ImageNet's mean and std made on the device) once.
EPOCHS = 2
FLAGS = ["--input_size", "32", "--patch_size", "8", "--warmup_epochs", "1", "--num_workers", "1", "--head_mlp_dim",
         "64", "--print_freq", "100", "--epochs", str(EPOCHS), "--device", "cpu", "--count_syncs"]
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
            decoder_num_heads=2, norm_pix_loss=True)


def test_the_counter_sees_each_kind_of_host_sync():
    x, tolist = torch.randn(8), torch.Tensor.tolist
    with SyncCounter() as counter:
        x.sum().item()
        bool(x[0] > 0)
        float(x.max())
        x.nonzero()
        x[x > 0]
        torch.equal(x, x)
        x.tolist()
        x.cpu()
        torch.tensor([1.0, 2.0])
        y = x * 2 + 1  # no sync: arithmetic, indexing by position, reductions into tensors
        y[1:3].mean()
    ops = [op for op, _ in counter.syncs]
    assert ops == ["aten._local_scalar_dense"] * 3 + ["aten.nonzero", "aten.index", "aten.equal", "Tensor.tolist",
                                                      "Tensor.cpu", "aten.lift_fresh"]
    assert counter.syncs[0][1][-1].startswith("test_the_counter_sees_each_kind_of_host_sync (test_syncs.py:")
    assert torch.Tensor.tolist is tolist  # the Tensor methods are restored on exit


@pytest.mark.parametrize("model, ranks, accum", [
    pytest.param("lut_vit_micro", 1, 1, id="lut-1rank"), pytest.param("mae_vit_micro", 1, 1, id="mae-1rank"),
    pytest.param("lut_vit_micro", 2, 2, id="lut-2ranks-accum2", marks=pytest.mark.slow)])  # SyncBatchNorm1d heads
def test_pretraining_makes_no_host_sync_per_step(flat_images, tmp_path, model, ranks, accum):
    # 64 images: 4 optimizer steps per epoch of a global batch of 16 on one or two ranks.
    data = tmp_path / "images"
    data.mkdir()
    for image in sorted(flat_images.iterdir())[:64]:
        (data / image.name).symlink_to(image)
    launcher = TORCHRUN if ranks == 2 else (sys.executable,)
    proc = run([*launcher, MICRO_PRETRAIN, *FLAGS, "--model", model, "--batch_size", 16 // ranks // accum,
                "--accum_iter", accum, "--data_path", data, "--output_dir", tmp_path / "out"])
    assert "4 optimizer steps per epoch" in proc.stdout
    for rank in range(ranks):
        with open(tmp_path / "out" / f"syncs-rank{rank}.json") as f:
            syncs = json.load(f)
        counts = collections.Counter((op, " < ".join(reversed(stack[-4:]))) for op, stack in syncs)
        per_step = {where: n for where, n in counts.items() if n > EPOCHS}
        assert not per_step, f"rank {rank}: host syncs in the training step (count over {EPOCHS} epochs: where)\n" + \
            "\n".join(f"{n} x {op} in {where}" for (op, where), n in per_step.items())
        assert 0 < len(counts) <= 8, counts  # the epoch's own and the run's start: seen, and in few places


@pytest.mark.parametrize("name", ["lut", "mae"])
def test_the_compiled_step_has_no_graph_breaks(name):
    torch.manual_seed(0)
    student = LUT(**TINY, head_mlp_dim=32) if name == "lut" else MaskedAutoencoderViT(**TINY)
    teacher = copy.deepcopy(student).eval().requires_grad_(False) if name == "lut" else None
    views = [torch.randn(4, 3, 32, 32) for _ in range(2 if teacher else 1)]
    args = argparse.Namespace(amp="bf16", mask_ratio=0.75)
    explanation = torch._dynamo.explain(pretrain_step)(TrainingForward(student), teacher, views, torch.rand(4, 16),
                                                       args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def _compiled_sync_bn_worker(rank, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    init_distributed(argparse.Namespace(device="cpu"))
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(6, 8), SyncBatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(2, 5, 6)[rank]

    def step(model):
        return model(x).square().mean()
    results = {}
    for name in ("eager", "compiled"):
        model = copy.deepcopy(head)
        torch._dynamo.reset()
        counters.clear()
        loss = step(model) if name == "eager" else torch.compile(step)(model)
        loss.backward()
        results[name] = dict(loss=loss.detach(), grads=[p.grad for p in model.parameters()],
                             buffers=[b.clone() for b in model.buffers()], breaks=sum(counters["graph_break"].values()),
                             graphs=counters["stats"]["unique_graphs"])
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    destroy_distributed()


def test_the_cross_rank_batchnorm_compiles_into_one_graph_equal_to_eager(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_compiled_sync_bn_worker, args=(port, str(tmp_path)), nprocs=2)
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        eager, compiled = res["eager"], res["compiled"]
        assert compiled["breaks"] == 0 and compiled["graphs"] == 1, compiled
        torch.testing.assert_close(compiled["loss"], eager["loss"])
        for a, b in zip(compiled["grads"] + compiled["buffers"], eager["grads"] + eager["buffers"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
