"""Fixtures shared by the test files: the demo data, written once per session."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """The data listings and shard indexes of the tests' runs (util.sources), in the session's temporary folder."""
    os.environ["LUT_DATA_CACHE"] = str(tmp_path_factory.mktemp("lut-data"))
    return os.environ["LUT_DATA_CACHE"]


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The demo ImageFolder: train/ (3,000 images) and val/ (1,000), 10 classes of 28 x 28 RGB PNGs."""
    root = tmp_path_factory.mktemp("demo")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_demo_data.py"), "--out", str(root)],
                   check=True, capture_output=True)
    return root


@pytest.fixture(scope="session")
def flat_images(demo, tmp_path_factory):
    """A flat folder with 256 of the demo training images, evenly spread over the classes (pre-training)."""
    folder = tmp_path_factory.mktemp("flat")
    train = sorted((demo / "train").rglob("*.png"))
    for i, path in enumerate(train[::len(train) // 256][:256]):
        shutil.copy(path, folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="session")
def small_demo(demo, tmp_path_factory):
    """301 training and 101 validation images of the demo data: odd sizes, so two ranks get unequal shards."""
    small = tmp_path_factory.mktemp("small_demo")
    for split, per_class in (("train", 30), ("val", 10)):
        for i, class_dir in enumerate(sorted((demo / split).iterdir())):
            (small / split / class_dir.name).mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:per_class + (i == 0)]:
                (small / split / class_dir.name / image.name).symlink_to(image)
    return small


# The order in which make test-all's pytest-xdist workers (one file at a time, --no-loadscope-reorder) take the
# test files: the longest first, so the two workers end together. xdist gives each worker two files at the start,
# round robin, and one more whenever a worker has at most two tests left; the SLURM file, which waits minutes on the
# cluster's time limit, is paired with a short file so that it holds no long one back.
LONGEST_FIRST = ("test_slurm.py", "test_restarts.py", "test_photometric.py", "test_finetune.py", "test_bf16_runs.py",
                 "test_pretrain.py", "test_multinode.py", "test_benchmark.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
