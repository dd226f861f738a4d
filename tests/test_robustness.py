"""main_robustness.py on small synthetic folders in each set's released layout, with a micro classifier whose
predictions are known: the sets' label rules, ImageNet-C's mCE, layout errors and the per-set resume."""
import builtins
import os

import numpy as np
import pytest
import torch
from PIL import Image

import main_robustness
import micro_finetune  # noqa: F401  (registers vit_micro)
import models_vit
from util.robustness import ALEXNET_ERROR, CORRUPTIONS, IMAGENET_A_WNIDS, IMAGENET_R_WNIDS, IMAGENET_WNIDS

R_FIRST = IMAGENET_WNIDS.index(IMAGENET_R_WNIDS[0])  # goldfish, class 1
A_FIRST = IMAGENET_WNIDS.index(IMAGENET_A_WNIDS[0])  # stingray, class 6 (class 10 and 1 are in neither subset)


def test_imagenet_r_and_a_compete_over_their_authors_200_classes():
    # Spot checks from the authors' eval scripts (hendrycks/imagenet-r, hendrycks/natural-adv-examples).
    for wnids, first, last in ((IMAGENET_R_WNIDS, "n01443537", "n12267677"),
                               (IMAGENET_A_WNIDS, "n01498041", "n12267677")):
        assert len(wnids) == 200 and wnids == sorted(set(wnids)) and set(wnids) <= set(IMAGENET_WNIDS)
        assert (wnids[0], wnids[-1]) == (first, last)
    assert "n02009912" in IMAGENET_R_WNIDS and "n02009912" in IMAGENET_A_WNIDS  # American egret, in both


def images(folder, n=2):
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((36, 36, 3), 40 * i, np.uint8)).save(os.path.join(folder, f"{i}.jpg"))


def class_folders(root, names, with_images):
    for name in names:
        os.makedirs(os.path.join(root, name), exist_ok=True)
    for name in with_images:
        images(os.path.join(root, name))


@pytest.fixture
def classifier(tmp_path):
    """A fine-tuned micro ViT whose logits ignore the image: class 10 highest, then R_FIRST, A_FIRST, the rest."""
    model = models_vit.MODELS["vit_micro"](img_size=32, patch_size=8, num_classes=1000)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[10], model.head.bias[R_FIRST], model.head.bias[A_FIRST] = 3.0, 2.0, 1.0
    path = tmp_path / "finetuned.pth"
    torch.save({"model": model.state_dict(), "args": {"model": "vit_micro", "input_size": 32, "patch_size": 8,
                                                           "global_pool": True}}, path)
    return path


@pytest.fixture
def sets(tmp_path):
    """All five sets, a few images each, in their released layouts."""
    root = tmp_path / "sets"
    class_folders(root / "imagenet-v2", [str(i) for i in range(1000)], ["2", "10"])  # "10" sorts before "2"
    wnid_10 = IMAGENET_WNIDS[10]
    class_folders(root / "imagenet-sketch", IMAGENET_WNIDS, [wnid_10, IMAGENET_WNIDS[11]])
    class_folders(root / "imagenet-r", IMAGENET_R_WNIDS, [IMAGENET_R_WNIDS[0], IMAGENET_R_WNIDS[1]])
    class_folders(root / "imagenet-a", IMAGENET_A_WNIDS, IMAGENET_A_WNIDS[:2])
    for severity in range(1, 6):
        class_folders(root / "imagenet-c" / "fog" / str(severity), IMAGENET_WNIDS,
                      [wnid_10] + [IMAGENET_WNIDS[12]] * (severity > 2))
    return root


def evaluate(monkeypatch, *flags):
    monkeypatch.setattr(builtins, "print", builtins.print)  # main() silences print on ranks other than 0
    args = main_robustness.get_args_parser().parse_args(["--model", "vit_micro", "--num_workers", "0",
                                                         *map(str, flags)])
    return main_robustness.main(args)


def test_each_set_is_scored_by_its_authors_rules(monkeypatch, tmp_path, classifier, sets, capsys):
    out = evaluate(monkeypatch, "--resume", classifier, "--data_root", sets, "--output_dir", tmp_path / "out")
    r = out["results"]
    assert r["imagenet-v2"]["acc1"] == 50.0  # folder "10" is class 10 (not the 2nd sorted folder), "2" is wrong
    assert r["imagenet-sketch"]["acc1"] == 50.0
    # Over the 200 classes of ImageNet-R (-A) its first class wins (class 10 is in neither): right for its images.
    assert r["imagenet-r"]["acc1"] == 50.0 and r["imagenet-r"]["images"] == 4
    assert r["imagenet-a"]["acc1"] == 50.0 and r["imagenet-a"]["images"] == 4
    errors = [100 - r[f"imagenet-c/fog/{s}"]["acc1"] for s in range(1, 6)]
    assert errors == [0, 0, 50, 50, 50] and out["corruption_error"]["fog"] == pytest.approx(30.0)
    assert "mCE" not in out  # only with all 15 corruptions
    table = capsys.readouterr().out
    assert "imagenet-c/fog/5" in table and "imagenet-r" in table
    saved = (tmp_path / "out" / "robustness.json").read_text()
    assert f'"checkpoint": "{classifier}"' in saved and '"amp": "none"' in saved


def test_mce_is_the_mean_of_errors_over_alexnets(monkeypatch):
    errors = {c: 10.0 + i for i, c in enumerate(CORRUPTIONS)}  # in %, the same at every severity
    results = {f"imagenet-c/{c}/{s}": {"acc1": 100 - e} for c, e in errors.items() for s in range(1, 6)}
    summary = main_robustness.summarize(results)
    by_hand = sum((10.0 + i) / ALEXNET_ERROR[c] for i, c in enumerate(CORRUPTIONS)) / 15  # e.g. 10 / 0.886428
    assert summary["mCE"] == pytest.approx(by_hand) and summary["mean_corruption_error"] == pytest.approx(17.0)
    assert "extra_mCE" not in summary
    # AlexNet itself scores mCE 100 (its errors, in %, over its errors)
    alexnet = {f"imagenet-c/{c}/{s}": {"acc1": 100 - 100 * e} for c, e in ALEXNET_ERROR.items() for s in range(1, 6)}
    assert main_robustness.summarize(alexnet)["mCE"] == pytest.approx(100.0)


@pytest.mark.parametrize("layout, message", [
    ("v2_wnids", "imagenet-v2 at .*: 1 class folders, not the release's 1000"),
    ("r_199", r"imagenet-r at .*: 199 class folders, not the release's 200 \(missing \['n01443537'\]"),
    ("c_unknown", "imagenet-c at .*: 'blur' is none of its 19 corruptions"),
])
def test_a_folder_that_breaks_its_sets_rules_is_refused_in_one_line(monkeypatch, tmp_path, classifier, layout,
                                                                    message):
    root = tmp_path / "sets"
    if layout == "v2_wnids":
        class_folders(root / "imagenet-v2", [IMAGENET_WNIDS[0]], [IMAGENET_WNIDS[0]])
    elif layout == "r_199":
        class_folders(root / "imagenet-r", IMAGENET_R_WNIDS[1:], [IMAGENET_R_WNIDS[1]])
    else:
        (root / "imagenet-c" / "blur").mkdir(parents=True)
    with pytest.raises(SystemExit, match=message):
        evaluate(monkeypatch, "--resume", classifier, "--data_root", root, "--output_dir", tmp_path / "out")


def test_a_killed_run_resumes_with_the_sets_not_yet_done(monkeypatch, tmp_path, classifier, sets, capsys):
    flags = ["--resume", classifier, "--output_dir", tmp_path / "out"]
    evaluate(monkeypatch, *flags, "--imagenet_v2_path", sets / "imagenet-v2")  # as if killed after ImageNet-V2
    capsys.readouterr()
    out = evaluate(monkeypatch, *flags, "--imagenet_v2_path", sets / "imagenet-v2", "--imagenet_r_path",
                   sets / "imagenet-r")
    log = capsys.readouterr().out
    assert "1 results already there, not recomputed" in log and log.count("Accuracy on") == 1  # ImageNet-R only
    assert set(out["results"]) == {"imagenet-v2", "imagenet-r"}
    with pytest.raises(SystemExit, match="holds results of another evaluation"):
        evaluate(monkeypatch, *flags, "--imagenet_v2_path", sets / "imagenet-v2", "--input_size", "64")
