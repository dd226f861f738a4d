"""Images in archives (util.sources): tar shards, ImageNet's class tars and Hugging Face datasets read by sample
index give the folder's images, labels and batches; bad archives are named in one line; runs on shards resume
bitwise and 2 ranks equal 1."""
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import util.dist as dist_util
import util.sources as sources
from runs import MICRO_PRETRAIN, ROOT, TORCHRUN, assert_same_state, assert_same_training_state, epoch_log, run
from util.augment import LUTTwoViews
from util.datasets import PretrainDataset, ResumableDistributedSampler, build_labelled, read_image
from util.knn import KNNEvaluator
from util.sources import LAYOUTS, TarImages, open_images

PACK = os.path.join(ROOT, "tools", "pack_shards.py")


def pixels(images, i):
    return np.asarray(read_image(images, i))


def write_folder(root):
    """train/ and val/ of 3 classes, PNG and JPEG images of several sizes."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 7), ("val", 3)):
        for c in ("bird", "cat", "dog"):
            os.makedirs(root / split / c)
            for i in range(count):
                img = Image.fromarray(rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8))
                img.save(root / split / c / f"{c}_{i}.{'png' if i % 2 else 'jpg'}")


def class_tars(folder, out):
    """ImageNet's train layout: one <class>.tar of the class's images."""
    os.makedirs(out)
    for c in sorted(os.listdir(folder)):
        with tarfile.open(out / f"{c}.tar", "w") as tar:
            for name in sorted(os.listdir(folder / c)):
                tar.add(folder / c / name, arcname=name)


def hf_dataset(folder):
    import datasets
    images = open_images(str(folder.parent), folder.name)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=images.classes)})
    return datasets.Dataset.from_dict(
        {"image": [{"bytes": open(images.open(i), "rb").read(), "path": None} for i in range(len(images))],
         "label": images.targets.tolist()}, features=features)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The same labelled images as a folder and in every archive layout; the source folder removed (copied first
    for the comparisons)."""
    pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("layouts")
    write_folder(root / "source")
    subprocess.run([sys.executable, PACK, "--data_path", root / "source", "--out", root / "wds", "--shard_size", "4"],
                   check=True, capture_output=True)
    class_tars(root / "source" / "train", root / "class_tars" / "train")
    shutil.copytree(root / "source" / "val", root / "class_tars" / "val")  # ImageNet's val: any labelled layout
    train, val = hf_dataset(root / "source" / "train"), hf_dataset(root / "source" / "val")
    import datasets
    datasets.DatasetDict(train=train, validation=val).save_to_disk(root / "saved")
    os.makedirs(root / "parquet" / "data")
    train.to_parquet(root / "parquet" / "data" / "train-00000-of-00001.parquet")
    val.to_parquet(root / "parquet" / "data" / "validation-00000-of-00001.parquet")
    shutil.copytree(root / "source", root / "folder")
    shutil.rmtree(root / "source")
    return root


@pytest.mark.parametrize("layout", ["wds", "class_tars", "saved", "parquet"])
def test_every_layout_gives_the_images_and_labels_of_the_folder(layouts, layout):
    for split in ("train", "val"):
        folder, other = open_images(str(layouts / "folder"), split), open_images(str(layouts / layout), split)
        assert len(other) == len(folder) == {"train": 21, "val": 9}[split]
        assert other.targets.tolist() == folder.targets.tolist() == sorted(folder.targets.tolist())
        assert other.classes in (folder.classes, None)  # webdataset's .cls members hold numbers only
        for i in range(len(folder)):
            assert np.array_equal(pixels(other, i), pixels(folder, i)), (split, i)
        labelled = build_labelled(str(layouts / layout), split, lambda img: img)
        assert labelled.num_classes == 3 and [labelled[i][1] for i in (0, len(folder) - 1)] == [0, 2]


def test_pretraining_batches_from_archives_equal_the_folders_with_several_workers(layouts):
    def batches(path):
        dataset = PretrainDataset(open_images(str(path), labelled=False), LUTTwoViews(16))
        sampler = ResumableDistributedSampler(len(dataset), seed=3)
        sampler.set_epoch(2)
        return list(torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=2))
    want = batches(layouts / "folder")
    for layout in ("wds", "class_tars", "saved", "parquet"):
        got = batches(layouts / layout)
        assert len(got) == len(want) == 6
        for a, b in zip(got, want):
            assert all(torch.equal(x, y) for x, y in zip(a[:2], b[:2]))
            assert all(torch.equal(a[2][k], b[2][k]) for k in b[2])


def test_a_shard_folder_named_by_split_as_imagenet_1k_wds_reads_each_split(layouts, tmp_path):
    for split, name in (("train", "imagenet1k-train"), ("val", "imagenet1k-validation")):
        for k, shard in enumerate(sorted(os.listdir(layouts / "wds" / split))):
            shutil.copy(layouts / "wds" / split / shard, tmp_path / f"{name}-{k:04d}.tar")
    for split in ("train", "val"):
        images, folder = open_images(str(tmp_path), split), open_images(str(layouts / "folder"), split)
        assert images.targets.tolist() == folder.targets.tolist()
        assert np.array_equal(pixels(images, len(images) - 1), pixels(folder, len(folder) - 1))


def shards_of_single_images(tmp_path, count):
    folder = tmp_path / "images"
    os.makedirs(folder)
    for i in range(count):
        Image.fromarray(np.full((4, 4, 3), [i % 256, i // 256, 0], np.uint8)).save(folder / f"{i:03d}.png")
    subprocess.run([sys.executable, PACK, "--data_path", folder, "--out", tmp_path / "wds", "--shard_size", "1"],
                   check=True, capture_output=True)
    return tmp_path / "wds" / "train"


def open_files():
    return len(os.listdir("/proc/self/fd"))


def test_reading_many_shards_keeps_at_most_max_open_shards_open(tmp_path):
    images = open_images(str(shards_of_single_images(tmp_path, sources.MAX_OPEN_SHARDS + 36)), labelled=False)
    before = open_files()
    order = np.random.default_rng(0).permutation(len(images))
    for i in order:
        assert pixels(images, i)[0, 0, :2].tolist() == [i % 256, i // 256]
    assert open_files() - before == sources.MAX_OPEN_SHARDS
    assert images.opened == len(images)  # each of the shards once: one open per shard per pass at most


def test_the_index_is_built_once_and_cached_outside_the_data_folder(layouts, tmp_path, capsys, data_cache):
    shutil.copytree(layouts / "wds", tmp_path / "wds")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    open_images(str(tmp_path / "wds"))
    assert "21 images indexed in" in capsys.readouterr().out
    assert len(open_images(str(tmp_path / "wds"))) == 21
    assert capsys.readouterr().out == ""  # read from the cache
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written there
    assert any(name.startswith("train-shards-all-") for name in os.listdir(data_cache))


def test_an_image_folder_is_listed_once_and_listed_again_when_it_changes(layouts, tmp_path, capsys):
    shutil.copytree(layouts / "folder", tmp_path / "folder")
    assert len(open_images(str(tmp_path / "folder"))) == 21
    assert "21 images listed in" in capsys.readouterr().out
    open_images(str(tmp_path / "folder"))
    assert capsys.readouterr().out == ""
    shutil.copy(tmp_path / "folder" / "train" / "cat" / "cat_0.jpg", tmp_path / "folder" / "train" / "cat" / "new.jpg")
    assert len(open_images(str(tmp_path / "folder"))) == 22
    out = capsys.readouterr().out
    assert "WARNING: the index" in out and "is stale (cat changed since it was built)" in out


def test_a_changed_shard_makes_its_index_stale_and_rebuilt(layouts, tmp_path, capsys):
    shutil.copytree(layouts / "wds", tmp_path / "wds")
    open_images(str(tmp_path / "wds"))
    shard = tmp_path / "wds" / "train" / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()][:4]  # the first 2 images only
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))
    capsys.readouterr()
    assert len(open_images(str(tmp_path / "wds"))) == 19
    assert "is stale (shard-000000.tar changed since it was built)" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["cut_mid_member", "cut_at_member_boundary", "damaged_header", "appended_archive"])
def test_a_truncated_or_damaged_shard_stops_in_one_line_naming_it(layouts, tmp_path, damage):
    shutil.copytree(layouts / "wds", tmp_path / "wds")
    shard = tmp_path / "wds" / "train" / "shard-000001.tar"
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    data, last, second = shard.read_bytes(), members[-1], members[2]
    shard.write_bytes({
        "cut_mid_member": data[:last.offset_data + last.size // 2],
        "cut_at_member_boundary": data[:last.offset_data + -(-last.size // 512) * 512],
        "damaged_header": data[:second.offset] + b"garbage!" * 64 + data[second.offset + 512:],  # tarfile stops here
        "appended_archive": data + (tmp_path / "wds" / "train" / "shard-000002.tar").read_bytes(),  # cat a.tar b.tar
    }[damage])
    with pytest.raises(ValueError) as stop:
        open_images(str(tmp_path / "wds"))
    assert str(stop.value).startswith(f"{shard} is truncated or damaged") and "\n" not in str(stop.value)


def test_shard_labels_come_from_cls_members_or_the_names_of_class_tars_only(layouts, tmp_path):
    for name in ("imagenet1k-validation-00.tar", "imagenet1k-validation-01.tar"):  # split-named, without .cls
        with tarfile.open(tmp_path / name, "w") as tar:
            tar.add(layouts / "folder" / "val" / "cat" / "cat_0.jpg", arcname=f"{name[-6:-4]}.jpg")
    assert open_images(str(tmp_path), "val", labelled=False).targets is None
    with pytest.raises(ValueError, match="not every image has a label"):
        build_labelled(str(tmp_path), "val", lambda img: img)
    (tmp_path / "single").mkdir()
    shutil.copy(tmp_path / "imagenet1k-validation-00.tar", tmp_path / "single" / "ILSVRC2012_img_val.tar")
    assert open_images(str(tmp_path / "single"), labelled=False).targets is None  # one tar: not a class
    bad = tmp_path / "bad" / "train" / "shard.tar"
    bad.parent.mkdir(parents=True)
    with tarfile.open(bad, "w") as tar:
        tar.add(layouts / "folder" / "val" / "cat" / "cat_0.jpg", arcname="0.jpg")
        info = tarfile.TarInfo("0.cls")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"cat"))
    with pytest.raises(ValueError, match=re.escape(f"{bad}: 0.cls holds 'cat', not an integer label")):
        open_images(str(tmp_path / "bad"))


def test_class_tars_number_and_order_classes_as_the_extracted_folder_does(tmp_path):
    for c in ("a-b", "a", "b"):  # "a-b.tar" sorts before "a.tar", "a-b/x" before "a/x": class names decide
        os.makedirs(tmp_path / "folder" / "train" / c)
        for i in range(2):
            Image.fromarray(np.full((4, 4, 3), 10 * i + len(c), np.uint8)).save(tmp_path / "folder" / "train" / c /
                                                                                f"{i}.png")
    class_tars(tmp_path / "folder" / "train", tmp_path / "tars" / "train")
    folder, tars = open_images(str(tmp_path / "folder")), open_images(str(tmp_path / "tars"))
    assert folder.classes == tars.classes == ["a", "a-b", "b"]
    assert folder.targets.tolist() == tars.targets.tolist() == [0, 0, 1, 1, 2, 2]
    assert all(np.array_equal(pixels(folder, i), pixels(tars, i)) for i in range(6))


def test_a_folder_of_both_images_and_archives_is_refused(layouts, tmp_path):
    shutil.copytree(layouts / "folder", tmp_path / "data")
    shutil.copy(layouts / "wds" / "train" / "shard-000000.tar", tmp_path / "data" / "train")
    with pytest.raises(ValueError, match="holds both .tar or .parquet files and image files or folders"):
        open_images(str(tmp_path / "data"))


def test_file_names_that_are_not_utf_8_round_trip():
    names = ["caf\udce9.jpg", "plain.png", ""]
    strings = sources.Strings(names)
    assert [strings[i] for i in range(3)] == names


def test_a_shard_truncated_after_indexing_is_a_stale_index_then_one_line(layouts, tmp_path, capsys):
    shutil.copytree(layouts / "wds", tmp_path / "wds")
    images = open_images(str(tmp_path / "wds"))
    shard = tmp_path / "wds" / "train" / "shard-000005.tar"
    shard.write_bytes(shard.read_bytes()[:600])  # into the image's bytes
    with pytest.raises(OSError, match="the shard is truncated"):  # an open dataset: its reads see the cut
        read_image(images, 20)
    with pytest.raises(ValueError, match=f"{shard} is truncated or damaged"):  # a restart
        open_images(str(tmp_path / "wds"))
    assert "shard-000005.tar changed since it was built" in capsys.readouterr().out


def test_an_unreadable_member_is_replaced_by_the_next_image_and_named(layouts, tmp_path, capsys):
    shutil.copytree(layouts / "wds", tmp_path / "wds")
    shard = tmp_path / "wds" / "train" / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        member = tar.getmember("000000001.png")
    with open(shard, "r+b") as f:  # the same size, garbage bytes: the index still holds
        f.seek(member.offset_data)
        f.write(b"\0" * member.size)
    images = open_images(str(tmp_path / "wds"), labelled=False)
    dataset = PretrainDataset(images, LUTTwoViews(16))
    assert all(torch.equal(a, b) for a, b in zip(dataset[(1, 5)][:2], dataset[(2, 5)][:2]))
    assert f"WARNING: cannot read image file {shard}:000000001.png" in capsys.readouterr().err


def test_a_folder_in_no_known_layout_gets_the_list_of_layouts(tmp_path):
    (tmp_path / "notes.txt").write_text("no images")
    with pytest.raises(ValueError) as error:
        open_images(str(tmp_path), labelled=False)
    assert str(error.value).startswith(f"no images found in {tmp_path}; accepted layouts: ")
    assert all(layout in str(error.value) for layout in LAYOUTS)
    with pytest.raises(FileNotFoundError,
                       match=f"{tmp_path}/val does not exist, nor has {tmp_path} val .tar or .parquet files"):
        open_images(str(tmp_path), "val")


def test_a_hugging_face_dataset_without_the_datasets_package_is_one_line(layouts, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(SystemExit, match="reading a Hugging Face dataset needs the datasets package: pip install "
                                         "datasets"):
        open_images(str(layouts / "saved"))


@pytest.mark.parametrize("how", ["hub_download", "load_dataset"])
def test_hf_name_reads_a_dataset_of_the_local_hugging_face_cache_without_network(layouts, tmp_path, how):
    """As huggingface-cli download leaves it (the repository's parquet files), or datasets.load_dataset (Arrow)."""
    if how == "hub_download":
        repo = tmp_path / "hub" / "datasets--tiny--animals"
        shutil.copytree(layouts / "parquet", repo / "snapshots" / ("a" * 40))
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("a" * 40)
    else:
        import datasets
        files = {split: str(layouts / "parquet" / "data" / f"{split}-00000-of-00001.parquet")
                 for split in ("train", "validation")}
        built = datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "build"))
        source = os.path.dirname(built["validation"].cache_files[0]["filename"])
        prepared = tmp_path / "datasets" / "tiny___animals" / "default" / "0.0.0" / os.path.basename(source)
        os.makedirs(prepared)
        for name in os.listdir(source):
            shutil.copy(os.path.join(source, name), prepared / name.replace("parquet-", "animals-"))
    code = ("import timm, main_pretrain; from util.sources import open_images; "  # as the scripts import them
            "images = open_images('hf:tiny/animals', 'val'); print(len(images), images.targets.tolist(), "
            "images.classes)")
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == f"9 {[0] * 3 + [1] * 3 + [2] * 3} ['bird', 'cat', 'dog']"
    assert time.time() - start < 30  # no waiting for the Hub's retries


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank0_first_worker(rank, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import argparse
    dist_util.init_distributed(argparse.Namespace(device="cpu", dist_timeout=0.05))  # 3 s for any collective

    def build():
        if rank == 0:
            time.sleep(6)
        return f"built by {rank}"
    result = dist_util.run_on_rank0_first(build)
    try:
        dist_util.run_on_rank0_first(lambda: (_ for _ in ()).throw(ValueError("rank 0 could not build it")))
    except ValueError as e:
        result += f"; {e}"
    try:
        dist_util.run_on_rank0_first(lambda: b"\xff".decode())
    except (UnicodeDecodeError, SystemExit) as e:
        result += f"; {type(e).__name__}"
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(result)
    dist_util.destroy_distributed()


def test_rank_0_builds_first_while_the_others_wait_longer_than_the_dist_timeout(tmp_path):
    mp.spawn(_rank0_first_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == [
        "built by 0; rank 0 could not build it; UnicodeDecodeError",  # rank 0's own exception
        "built by 1; rank 0 could not build it; SystemExit"]  # its message, where the type takes more


# ---------------------------------------------------------------- training on shards

PRETRAIN = ["--model", "lut_vit_micro", "--input_size", "32", "--patch_size", "8", "--batch_size", "16",
            "--warmup_epochs", "1", "--head_mlp_dim", "64", "--print_freq", "4", "--epochs", "2", "--seed", "3"]


def packed(images, root, shard_size):
    """`images` packed into shards of shard_size under root/wds, the copy they were packed from removed."""
    shutil.copytree(images, root / "images")
    subprocess.run([sys.executable, PACK, "--data_path", root / "images", "--out", root / "wds", "--shard_size",
                    str(shard_size)], check=True, capture_output=True)
    shutil.rmtree(root / "images")
    return root / "wds"


@pytest.fixture(scope="module")
def flat_shards(flat_images, tmp_path_factory):
    """flat_images in 5 shards."""
    return packed(flat_images, tmp_path_factory.mktemp("flat_shards"), 60)


@pytest.mark.slow
def test_pretraining_on_shards_stopped_killed_and_resumed_is_bitwise_the_folder_run(flat_images, flat_shards,
                                                                                     tmp_path):
    run([sys.executable, MICRO_PRETRAIN, *PRETRAIN, "--data_path", flat_images, "--output_dir", tmp_path / "folder"])
    common = [sys.executable, MICRO_PRETRAIN, *PRETRAIN, "--data_path", flat_shards, "--num_workers", "2",
              "--output_dir", tmp_path / "shards"]
    run([*common, "--stop_at_step", "5"])  # mid-epoch
    killed = run(common, check=False, env={"KILL_AT": "after:checkpoint-last.pth:1"})  # killed after epoch 0
    assert killed.returncode == -9
    run(common)
    assert_same_training_state(tmp_path / "folder" / "checkpoint-last.pth", tmp_path / "shards" / "checkpoint-last.pth")
    straight, resumed = epoch_log(tmp_path / "folder"), epoch_log(tmp_path / "shards")
    assert [r["epoch"] for r in resumed] == [0, 1]
    assert all(b[k] == pytest.approx(a[k], rel=1e-6) for a, b in zip(straight, resumed) for k in a)


@pytest.mark.slow
def test_two_ranks_on_shards_equal_one_rank_on_the_folder(flat_images, flat_shards, tmp_path):
    flags = [*PRETRAIN, "--epochs", "1", "--stop_at_step", "2", "--dump_weights", "--num_workers", "0"]
    run([*TORCHRUN, MICRO_PRETRAIN, *flags, "--data_path", flat_shards, "--output_dir", tmp_path / "ddp",
         "--batch_size", "8", "--device", "cpu"])
    run([sys.executable, MICRO_PRETRAIN, *flags, "--data_path", flat_images, "--output_dir", tmp_path / "single"])
    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pth") for r in (0, 1))
    assert_same_state(rank0, rank1)
    single = torch.load(tmp_path / "single" / "rank0.pth")
    for k in single:
        torch.testing.assert_close(rank0[k].float(), single[k].float(), rtol=1e-4, atol=1e-5, msg=k)


def test_tar_images_pickle_without_their_open_files(layouts):
    import pickle
    images = open_images(str(layouts / "wds"))
    pixels(images, 0)
    copy = pickle.loads(pickle.dumps(images))
    assert isinstance(copy, TarImages) and len(copy._fds) == 0
    assert np.array_equal(pixels(copy, 20), pixels(images, 20))


def test_data_speed_measures_every_layout_and_direct_parquet_reads_whole_row_groups(tmp_path):
    out = tmp_path / "speed.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "data_speed.py"), "--synthetic", "60",
                    "--shard_sizes", "20", "--num_reads", "30", "--output_json", out], check=True,
                   capture_output=True, timeout=600)
    rows = {r["layout"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["image files"]["files_opened"] == 30  # one per image read
    assert rows["tar shards of 20 (3 shards)"]["files_opened"] == 3  # one per shard
    assert all(r["images"] == 60 for r in rows.values())
    assert rows["parquet, row groups read directly"]["bytes_decoded_per_byte_wanted"] > 30  # one row group of 60


@pytest.fixture(scope="module")
def demo_shards(small_demo, tmp_path_factory):
    """small_demo's train/ and val/ in shards of 50 (with .cls labels)."""
    return packed(small_demo, tmp_path_factory.mktemp("demo_shards"), 50)


@pytest.mark.slow
def test_fine_tuning_and_knn_on_shards_are_bitwise_the_folder_runs(small_demo, demo_shards, tmp_path):
    micro = os.path.join(ROOT, "tests", "micro_finetune.py")
    common = ["--model", "vit_micro", "--input_size", "32", "--patch_size", "8", "--num_workers", "2",
              "--batch_size", "64"]
    for name, data in (("folder", small_demo), ("shards", demo_shards)):
        run([sys.executable, micro, "finetune", *common, "--epochs", "2", "--data_path", data, "--output_dir",
             tmp_path / name])
        run([sys.executable, micro, "knn", *common, "--data_path", data, "--output_dir", tmp_path / f"knn_{name}"])
    assert_same_training_state(tmp_path / "folder" / "checkpoint-last.pth", tmp_path / "shards" / "checkpoint-last.pth")
    assert epoch_log(tmp_path / "shards") == epoch_log(tmp_path / "folder")
    assert (tmp_path / "knn_shards" / "knn.json").read_text() == (tmp_path / "knn_folder" / "knn.json").read_text()


def test_a_datasets_image_and_label_columns_are_found_or_named(layouts, tmp_path):
    import datasets
    folder = open_images(str(layouts / "folder"), "val")
    data = datasets.load_from_disk(str(layouts / "saved" / "validation"))
    renamed = datasets.Dataset.from_dict(
        {"photo": data.cast_column("image", datasets.Image(decode=False))["image"], "target": folder.targets.tolist(),
         "thumb": [None] * len(folder)},
        features=datasets.Features({"photo": datasets.Image(), "target": datasets.Value("int64"),
                                    "thumb": datasets.Image()}))
    renamed.save_to_disk(tmp_path / "val")
    with pytest.raises(ValueError, match="2 Image columns .* name the images with --image_column"):
        open_images(str(tmp_path), "val")
    with pytest.raises(ValueError, match="not every image has a label"):
        build_labelled(str(tmp_path), "val", lambda img: img, image_column="photo")
    assert open_images(str(tmp_path), "val", labelled=False, image_column="photo").targets is None
    images = open_images(str(tmp_path), "val", image_column="photo", label_column="target")
    assert images.targets.tolist() == folder.targets.tolist()
    assert np.array_equal(pixels(images, 4), pixels(folder, 4))


def test_packing_into_a_folder_that_holds_shards_is_refused(layouts, tmp_path):
    shutil.copytree(layouts / "wds", tmp_path / "wds")
    proc = subprocess.run([sys.executable, PACK, "--data_path", layouts / "folder", "--out", tmp_path / "wds"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip() == (
        f"{tmp_path / 'wds' / 'train'} is not empty: shards left there would be read with the new ones; remove it "
        f"or choose another --out")


def test_splits_that_cannot_be_compared_or_found_are_named(layouts, tmp_path):
    import datasets
    datasets.load_from_disk(str(layouts / "saved" / "train")).save_to_disk(tmp_path / "single")
    with pytest.raises(ValueError, match="is one Hugging Face dataset without splits: save a DatasetDict"):
        open_images(str(tmp_path / "single"), "val")
    assert len(open_images(str(tmp_path / "single"), labelled=False)) == 21  # pre-training takes it whole
    shutil.copytree(layouts / "folder", tmp_path / "renamed")
    os.rename(tmp_path / "renamed" / "val" / "cat", tmp_path / "renamed" / "val" / "lynx")
    with pytest.raises(ValueError, match=r"train and val splits have different classes \(cat, lynx\.\.\.\)"):
        KNNEvaluator(str(tmp_path / "renamed"), input_size=16)
