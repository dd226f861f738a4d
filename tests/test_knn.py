"""Weighted k-NN evaluation: exact votes on toy features, data checks, and rank-independent results."""
import math
import re
import sys

import pytest
import torch
import torch.nn.functional as F

from runs import MICRO_FINETUNE, MICRO_PRETRAIN, TORCHRUN, epoch_log, run
from util.knn import KNNEvaluator, knn_hits, knn_scores


def test_one_hot_class_features_are_classified_perfectly():
    classes = torch.arange(10)
    train_labels, test_labels = classes.repeat(30), classes.repeat(7)
    scores = knn_scores(F.one_hot(train_labels, 10).float(), train_labels, F.one_hot(test_labels, 10).float(),
                        num_classes=10, k=20, temperature=0.07)
    top1, top5 = knn_hits(scores, test_labels)
    assert top1 == top5 == 70


def test_votes_are_sums_of_exp_similarity_over_temperature():
    angle = torch.tensor([0.0, math.pi / 2, math.pi / 3, math.pi])  # cos to the query: 1, 0, 0.5, -1
    train = torch.stack([angle.cos(), angle.sin()], dim=1)
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[1.0, 0.0]])
    scores = knn_scores(train, labels, query, num_classes=3, k=3, temperature=0.5)
    expected = torch.tensor([[math.exp(1 / 0.5), math.exp(0 / 0.5) + math.exp(0.5 / 0.5), 0.0]])
    torch.testing.assert_close(scores, expected)


def test_one_close_neighbour_outweighs_several_distant_ones():
    # Class 0: one neighbour at cos 1; class 1: three at cos 0.9. A majority vote says 1, the weighted vote 0.
    angle = torch.tensor([0.0, math.acos(0.9), -math.acos(0.9), math.acos(0.9)])
    train = torch.stack([angle.cos(), angle.sin()], dim=1)
    scores = knn_scores(train, torch.tensor([0, 1, 1, 1]), torch.tensor([[1.0, 0.0]]), num_classes=2, k=4,
                        temperature=0.07)
    assert scores.argmax().item() == 0


def test_knn_needs_labelled_train_and_val_folders(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="k-NN evaluation needs labelled"):
        KNNEvaluator(str(tmp_path), input_size=32)


def knn(*flags, launcher=(sys.executable,)):
    proc = run([*launcher, MICRO_FINETUNE, "knn", "--model", "vit_micro", "--input_size", "32", "--patch_size", "8",
                "--num_workers", "0", "--batch_size", "128", *flags])
    return re.search(r"k-NN \(k 20, T 0.07\): top-1 ([\d.]+)%, top-5 ([\d.]+)%", proc.stdout).groups()


@pytest.mark.slow
def test_two_ranks_give_the_single_process_accuracy(small_demo):
    """Random-weight features (the same on every rank): the bank is gathered and hits summed without repeats."""
    single = knn("--data_path", small_demo)
    assert single == knn("--data_path", small_demo, "--device", "cpu", launcher=TORCHRUN)
    assert float(single[0]) > 30  # chance: 10 %; even random ViT features cluster Fashion-MNIST


def pretrain(*flags):
    return run([sys.executable, MICRO_PRETRAIN, "--model", "lut_vit_micro", "--input_size", "32", "--patch_size",
                "8", "--batch_size", "16", "--warmup_epochs", "1", "--num_workers", "0", "--head_mlp_dim", "64",
                *flags], check=False)


@pytest.mark.slow
def test_pretraining_reports_knn_accuracy_every_knn_freq_epochs(small_demo, tmp_path):
    proc = pretrain("--data_path", small_demo, "--output_dir", tmp_path, "--epochs", 3, "--knn_freq", 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = epoch_log(tmp_path)
    assert ["train_knn_top1" in r for r in log] == [False, True, True]  # epoch 2 of 2, and the last epoch
    assert all(20 < r["train_knn_top1"] <= r["train_knn_top5"] <= 100 for r in log[1:]), log


def test_pretraining_with_knn_freq_needs_a_labelled_val_folder(small_demo, tmp_path):
    proc = pretrain("--data_path", small_demo / "train", "--output_dir", tmp_path, "--knn_freq", 1)
    assert proc.returncode != 0 and "k-NN evaluation needs labelled" in proc.stderr
    assert "Traceback" not in proc.stderr
