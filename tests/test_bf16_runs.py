"""bf16 autocast end to end on CPU: pre-training (LUT and MAE, one rank and two gloo ranks), fine-tuning, linear
probing, k-NN and robustness, each run with --amp bf16 and again with --amp none. The bf16 run must succeed, log
finite losses close to the float32 run's and yet differ from them: float32 runs are bitwise reproducible (the resume
tests rely on it), so equal numbers would mean --amp bf16 was ignored.

Tolerances are set from measured bf16-vs-float32 differences (in the comments) with a margin of 3x or more; a broken
bf16 path (a collapsed encoder, wrong logits) would move losses by far more and accuracies to chance (10 %).
"""
import argparse
import builtins
import json
import math
import os
import re
import sys

import pytest
import torch

import main_finetune
import main_linprobe
import main_robustness
import micro_finetune  # noqa: F401  (registers vit_micro)
from runs import MICRO_FINETUNE, MICRO_PRETRAIN, TORCHRUN, epoch_log, run
from util.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

SCRIPTS = {"finetune": main_finetune, "linprobe": main_linprobe}

# Two epochs of 16 steps, a global batch of 16 on either one or two ranks.
PRETRAIN_FLAGS = ["--input_size", "32", "--patch_size", "8", "--warmup_epochs", "1", "--num_workers", "0",
                  "--head_mlp_dim", "64", "--print_freq", "100", "--epochs", "2", "--lr", "2e-3", "--device", "cpu"]
ENCODER_FLAGS = ["--model", "vit_micro", "--input_size", "32", "--patch_size", "8", "--num_workers", "0",
                 "--device", "cpu"]
# Two epochs on the demo data (3000 training images, 1000 validation images): flags of tests/test_finetune.py.
DOWNSTREAM_FLAGS = {
    "finetune": ["--batch_size", "64", "--print_freq", "100", "--epochs", "2", "--warmup_epochs", "1", "--lr", "4e-3",
                 "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--aa", "none"],
    "linprobe": ["--batch_size", "64", "--print_freq", "100", "--epochs", "2", "--warmup_epochs", "1", "--lr", "5",
                 "--lut_global"],
}
# Relative tolerances of the pre-training terms, bf16 vs float32: 4x to 16x the largest difference measured over
# both epochs on one and two ranks (LUT also with seeds 1 and 2). MAE's pixel loss averages bf16's rounding over
# 37k errors per batch, so its tolerance is tight enough to fail a bf16 run that drew other masks than the float32
# run (tried: 2.6e-3); LUT's broader-context term is the most sensitive one (tests/test_gpu.py).
PRETRAIN_REL = {
    "lut_vit_micro": {"train_loss": 1e-2, "train_mim": 1e-3, "train_bc": 2e-2},  # measured 9.2e-4, 1.4e-4, 4.6e-3
    "mae_vit_micro": {"train_loss": 1e-4},  # measured 6.1e-6
}
# Relative tolerance of the train and test losses of the classifiers: measured at most 1.2e-3 (fine-tuning 9.3e-4,
# linear probing 6.6e-5, --eval 5.6e-5, robustness 1.2e-3).
LOSS_REL = 1e-2
# Accuracies on 1000 validation images, percentage points. Measured: fine-tuning 0.6 (46.5 vs 45.9 top-1), linear
# probing 0.4, k-NN 0.4 (top-5), robustness 0.1; a broken bf16 path would drop them to chance (10 %), 8 to 47 points
# below the float32 run's.
ACC_TOL = 2.0


def finite(values):
    return all(math.isfinite(v) for v in values)


@pytest.fixture(scope="module")
def pretraining(flat_images, tmp_path_factory):
    """pretraining(model, ranks, amp): the output folder of that micro pre-training run, run once on first use."""
    done = {}

    def get(model, ranks, amp):
        if (model, ranks, amp) not in done:
            out = tmp_path_factory.mktemp(f"pretrain_{model}_{ranks}_{amp}")
            launcher = TORCHRUN if ranks == 2 else (sys.executable,)
            run([*launcher, MICRO_PRETRAIN, *PRETRAIN_FLAGS, "--model", model, "--batch_size", 16 // ranks,
                 "--amp", amp, "--data_path", flat_images, "--output_dir", out])
            done[model, ranks, amp] = out
        return done[model, ranks, amp]
    return get


@pytest.fixture(scope="module")
def pretrained(pretraining):
    """The float32 one-rank micro LUT checkpoint (also the baseline of the pre-training test)."""
    return pretraining("lut_vit_micro", 1, "none") / "checkpoint-last.pth"


@pytest.fixture(scope="module")
def downstream(demo, pretrained, tmp_path_factory):
    """downstream(script, amp): the output folder of fine-tuning or linear probing `pretrained` on the demo data."""
    done = {}

    def get(script, amp):
        if (script, amp) not in done:
            out = tmp_path_factory.mktemp(f"{script}_{amp}")
            run([sys.executable, MICRO_FINETUNE, script, *ENCODER_FLAGS, *DOWNSTREAM_FLAGS[script], "--amp", amp,
                 "--data_path", demo, "--finetune", pretrained, "--output_dir", out])
            done[script, amp] = out
        return done[script, amp]
    return get


@pytest.mark.parametrize("model, ranks", [("lut_vit_micro", 1), ("lut_vit_micro", 2), ("mae_vit_micro", 1)],
                         ids=["lut-1rank", "lut-2ranks_syncbn", "mae-1rank"])
def test_bf16_pretraining_losses_are_finite_close_to_float32_and_not_equal(pretraining, model, ranks):
    fp32, bf16 = (epoch_log(pretraining(model, ranks, amp)) for amp in ("none", "bf16"))
    assert [r["epoch"] for r in bf16] == [r["epoch"] for r in fp32] == [0, 1]
    for a, b in zip(fp32, bf16):
        assert finite(b[k] for k in PRETRAIN_REL[model]), b
        for k, rel in PRETRAIN_REL[model].items():
            assert b[k] == pytest.approx(a[k], rel=rel), (k, a, b)
        assert b["train_loss"] != a["train_loss"], "bitwise the float32 loss: --amp bf16 was not applied"
    # autocast computes in bf16 but keeps float32 weights (and teacher) for the optimizer.
    ckpt = load_checkpoint(pretraining(model, ranks, "bf16") / "checkpoint-last.pth")
    assert ckpt["args"]["amp"] == "bf16"
    for key in ("model", "model_ema"):
        assert {v.dtype for v in ckpt.get(key, {}).values() if v.is_floating_point()} <= {torch.float32}, key


@pytest.mark.parametrize("script", ["finetune", "linprobe"])
def test_bf16_training_and_evaluation_of_a_classifier_are_close_to_float32_and_not_equal(monkeypatch, demo, downstream,
                                                                                          script):
    fp32, bf16 = (epoch_log(downstream(script, amp)) for amp in ("none", "bf16"))
    assert [r["epoch"] for r in bf16] == [r["epoch"] for r in fp32] == [0, 1]
    for a, b in zip(fp32, bf16):
        assert finite([b["train_loss"], b["test_loss"]]), b
        for k in ("train_loss", "test_loss"):
            assert b[k] == pytest.approx(a[k], rel=LOSS_REL), (k, a, b)
            assert b[k] != a[k], f"bitwise the float32 {k}: --amp bf16 was not applied"
        for k in ("test_acc1", "test_acc5"):
            assert abs(b[k] - a[k]) <= ACC_TOL, (k, a, b)
    # chance: 10 % (measured: fine-tuning 46 %, linear probing 18 %; a collapsed probe predicts one class, 10 %)
    assert bf16[-1]["test_acc1"] > {"finetune": 30, "linprobe": 13}[script], bf16

    # bf16 training changes the weights, so the test losses above differ even if evaluation ignored --amp: --eval of
    # the float32 run's checkpoint, in bf16 and in float32 (in this process, for the unrounded loss it returns).
    monkeypatch.setattr(builtins, "print", builtins.print)  # main() silences print on ranks other than 0
    parser = argparse.ArgumentParser(parents=[SCRIPTS[script].get_args_parser()])
    flags = ["--model", "vit_micro", "--num_workers", "0", "--device", "cpu", "--batch_size", "128", "--eval",
             "--resume", str(downstream(script, "none") / "checkpoint-last.pth"), "--data_path", str(demo),
             *(["--lut_global"] if script == "linprobe" else [])]
    fp32, bf16 = (SCRIPTS[script].main(parser.parse_args([*flags, "--amp", amp])) for amp in ("none", "bf16"))
    assert bf16["count"] == fp32["count"] == 1000
    assert math.isfinite(bf16["loss"]) and bf16["loss"] == pytest.approx(fp32["loss"], rel=LOSS_REL), (fp32, bf16)
    assert bf16["loss"] != fp32["loss"], "--eval gave the float32 loss exactly: --amp bf16 was not applied"
    for k in ("acc1", "acc5"):
        assert abs(bf16[k] - fp32[k]) <= ACC_TOL, (k, fp32, bf16)


def test_bf16_knn_accuracy_is_close_to_float32_and_not_equal(demo, pretrained, tmp_path):
    result = {}
    for amp in ("none", "bf16"):
        run([sys.executable, MICRO_FINETUNE, "knn", *ENCODER_FLAGS, "--batch_size", "128", "--amp", amp,
             "--data_path", demo, "--finetune", pretrained, "--output_dir", tmp_path / amp])
        with open(tmp_path / amp / "knn.json") as f:
            result[amp] = json.load(f)
    fp32, bf16 = result["none"], result["bf16"]
    for k in ("knn_top1", "knn_top5"):
        assert abs(bf16[k] - fp32[k]) <= ACC_TOL, (fp32, bf16)
    assert bf16["knn_top1"] > 40, bf16  # chance: 10 % (measured 57 %)
    # k-NN logs no loss, only hit counts: measured 1 top-1 and 4 top-5 votes of 1000 changed by bf16 features.
    assert (bf16["knn_top1"], bf16["knn_top5"]) != (fp32["knn_top1"], fp32["knn_top5"]), \
        "the float32 k-NN hits exactly: --amp bf16 was not applied"


@pytest.fixture(scope="module")
def imagenet_v2(demo, tmp_path_factory):
    """The demo validation images in ImageNet-V2's layout: folder "i" holds the images of demo class i, the other
    990 of the 1000 folders are empty."""
    root = tmp_path_factory.mktemp("robustness") / "imagenet-v2"
    classes = sorted(os.listdir(demo / "val"))
    for i in range(1000):
        (root / str(i)).mkdir(parents=True)
    for i, name in enumerate(classes):
        for image in sorted((demo / "val" / name).iterdir()):
            (root / str(i) / image.name).symlink_to(image)
    return root


def test_bf16_robustness_evaluation_is_close_to_float32_and_not_equal(monkeypatch, capsys, downstream, imagenet_v2,
                                                                      tmp_path):
    # The float32 fine-tuned classifier as a 1000-class one: its 10 classes first, the others never win. Its head is
    # scaled by 10 (the same predictions, a confident classifier's logits): after two short epochs its loss is
    # 1.59, and the 4-decimal loss that main_robustness prints hardly resolves bf16 (measured 1.5901 vs 1.5900);
    # scaled, 2.7477 vs 2.7443 (1.2e-3 relative).
    ckpt = load_checkpoint(downstream("finetune", "none") / "checkpoint-last.pth")
    state = dict(ckpt["model"])
    weight, bias = state["head.weight"], state["head.bias"]
    state["head.weight"] = torch.cat([10 * weight, weight.new_zeros(990, weight.shape[1])])
    state["head.bias"] = torch.cat([10 * bias, bias.new_full((990,), -100.0)])
    torch.save({"model": state, "args": ckpt["args"]}, tmp_path / "classifier.pth")

    monkeypatch.setattr(builtins, "print", builtins.print)  # main() silences print on ranks other than 0
    result, loss = {}, {}
    for amp in ("none", "bf16"):
        args = main_robustness.get_args_parser().parse_args(
            ["--model", "vit_micro", "--num_workers", "0", "--device", "cpu", "--amp", amp, "--resume",
             str(tmp_path / "classifier.pth"), "--imagenet_v2_path", str(imagenet_v2), "--output_dir",
             str(tmp_path / amp)])
        result[amp] = main_robustness.main(args)["results"]["imagenet-v2"]
        loss[amp] = float(re.findall(r"Accuracy on 1000 test images: .* loss ([\d.]+)", capsys.readouterr().out)[-1])
    fp32, bf16 = result["none"], result["bf16"]
    assert bf16["images"] == fp32["images"] == 1000
    for k in ("acc1", "acc5"):
        assert abs(bf16[k] - fp32[k]) <= ACC_TOL, (fp32, bf16)
    assert bf16["acc1"] > 30, bf16  # chance: 10 % (measured 46 %)
    assert math.isfinite(loss["bf16"]) and loss["bf16"] == pytest.approx(loss["none"], rel=LOSS_REL), loss
    assert loss["bf16"] != loss["none"], "the float32 loss exactly: --amp bf16 was not applied"
    with open(tmp_path / "bf16" / "robustness.json") as f:
        assert json.load(f)["config"]["amp"] == "bf16"
