"""Data pipeline: image discovery, seeded augmentation, resumable sampling, demo data."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DistributedSampler

from util.augment import (BICUBIC, LUTTwoViews, eval_transform, linprobe_transform, lut_views_on_device,
                          mae_transform, normalize)
from util.datasets import (
    PretrainDataset,
    ResumableDistributedSampler,
    augmentation_seed,
    build_labelled,
    check_images,
    check_unreadable,
    load_image,
)
from util.sources import FolderImages, open_images
from util.photometric import solarize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_image(h=40, w=60, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def save_images(folder, names):
    os.makedirs(folder, exist_ok=True)
    for i, name in enumerate(names):
        random_image(8, 8, seed=i).save(os.path.join(folder, name))


def as_float_pipeline(transform):
    """`transform` (a Compose ending in PILToTensor) as torchvision's usual float pipeline: ToTensor + Normalize."""
    return T.Compose(transform.transforms[:-1] + [T.ToTensor(), T.Normalize(IMAGENET_DEFAULT_MEAN,
                                                                            IMAGENET_DEFAULT_STD)])


# ---------------------------------------------------------------- augmentation

def test_augmentation_is_a_pure_function_of_aug_seed(tmp_path):
    random_image().save(tmp_path / "a.png")
    ds = PretrainDataset(FolderImages([str(tmp_path / "a.png")]), LUTTwoViews(32))
    rng_before = torch.get_rng_state()
    first, again, other = ds[(0, 123)], ds[(0, 123)], ds[(0, 124)]
    assert torch.equal(torch.get_rng_state(), rng_before)
    flat = [[*views, *params.values()] for *views, params in (first, again, other)]
    assert all(torch.equal(a, b) for a, b in zip(flat[0], flat[1]))
    assert not all(torch.equal(a, b) for a, b in zip(flat[0], flat[2]))
    assert not any(torch.equal(a, b) for a, b in zip(first[:2], other[:2]))


def test_lut_views_are_uint8_of_input_size_and_normalize_gives_imagenet_normalisation():
    grey = Image.new("RGB", (60, 40), (128, 128, 128))
    view1, view2, _ = LUTTwoViews(32)(grey)
    assert view1.shape == view2.shape == (3, 32, 32) and view1.dtype == view2.dtype == torch.uint8
    assert torch.equal(view1, torch.full((3, 32, 32), 128, dtype=torch.uint8))
    expected = (128 / 255 - torch.tensor(IMAGENET_DEFAULT_MEAN)) / torch.tensor(IMAGENET_DEFAULT_STD)
    torch.testing.assert_close(normalize(view1), expected.view(3, 1, 1).expand(3, 32, 32))


@pytest.mark.parametrize("name", ["lut_views", "mae", "linprobe", "eval"])
def test_uint8_views_normalised_as_a_batch_equal_torchvision_float_pipeline_bitwise(name):
    if name == "lut_views":  # view 1; view 2 leaves the worker before its photometric chain
        views = LUTTwoViews(32)
        transform = lambda img: views(img)[0]  # noqa: E731
        reference = as_float_pipeline(T.Compose([T.Resize(32, interpolation=BICUBIC), T.RandomCrop(
            32, padding=4, padding_mode="reflect"), T.RandomHorizontalFlip(), T.PILToTensor()]))
    else:
        transform = {"mae": mae_transform(32), "linprobe": linprobe_transform(32), "eval": eval_transform(32)}[name]
        reference = as_float_pipeline(transform)
    images = [random_image(60 + 7 * k, 50 + 5 * k, seed=k) for k in range(4)]

    def seeded(pipeline, img, seed):  # one seed per image, as PretrainDataset does
        torch.manual_seed(seed)
        return pipeline(img)

    for seed in range(8):
        got = normalize(torch.stack([seeded(transform, img, 10 * seed + k) for k, img in enumerate(images)]))
        want = torch.stack([seeded(reference, img, 10 * seed + k) for k, img in enumerate(images)])
        assert got.dtype == torch.float32 and torch.equal(got, want), (name, seed)
    floats = torch.randn(2, 3, 4, 4)
    assert normalize(floats) is floats  # timm's fine-tuning views arrive normalised


def lut_views(views, img, seeds):
    """LUTTwoViews on `img` for each seed, the device half run on the batch -> normalised view1, view2, params."""
    samples = []
    for seed in seeds:
        torch.manual_seed(seed)
        samples.append(views(img))
    view1, view2, params = torch.utils.data.default_collate(samples)
    return *lut_views_on_device(view1, view2, params, torch.device("cpu")), params


def test_view1_is_photometrically_clean_and_view2_is_not():
    colour = (200, 50, 100)
    view1, view2, _ = lut_views(LUTTwoViews(32), Image.new("RGB", (48, 40), colour), range(20))
    # crop, flip and reflect padding cannot change a constant image; any colour op would
    assert torch.equal(view1, normalize(torch.tensor(colour, dtype=torch.uint8).view(1, 3, 1, 1).expand(20, 3, 32, 32)))
    changed = (view2 != view1).flatten(1).any(1)
    assert changed.sum() >= 15


def test_view2_applies_exactly_one_of_grayscale_solarize_blur_uniformly():
    _, _, params = lut_views(LUTTwoViews(16), random_image(16, 16), range(300))
    counts = np.bincount(params["choice"].numpy(), minlength=3)
    assert len(counts) == 3 and all(70 <= c <= 130 for c in counts), counts
    blurred = params["radius"][params["choice"] == 2]
    assert blurred.min() >= 0.1 and blurred.max() <= 2.0


def test_view2_colour_jitter_applies_to_about_four_in_five_images_with_its_ranges():
    _, _, params = lut_views(LUTTwoViews(16), random_image(16, 16), range(400))
    jitter = params["jitter"]
    assert 0.75 <= jitter.float().mean() <= 0.85
    for name, (low, high) in {"brightness": (0.6, 1.4), "contrast": (0.6, 1.4), "saturation": (0.8, 1.2),
                              "hue": (-0.1, 0.1)}.items():
        drawn = params[name][jitter]
        assert low <= drawn.min() and drawn.max() <= high and drawn.std() > (high - low) / 5, name
    assert all(sorted(order.tolist()) == [0, 1, 2, 3] for order in params["order"])


def test_solarize_inverts_pixels_from_128_up():
    img = torch.tensor([127, 128, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    assert solarize(img)[0, 0, 0].tolist() == [127, 127, 0]


# ---------------------------------------------------------------- sampler

@pytest.mark.parametrize("world_size", [1, 3, 4])
@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("shuffle", [True, False])
def test_sampler_splits_indices_like_distributed_sampler(world_size, drop_last, shuffle):
    n, seed, epoch = 50, 7, 3
    for rank in range(world_size):
        ref = DistributedSampler(range(n), world_size, rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        ref.set_epoch(epoch)
        ours = ResumableDistributedSampler(n, world_size, rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        ours.set_epoch(epoch)
        assert [i for i, _ in ours] == list(ref)
        assert len(ours) == len(ref)


def test_rank_takes_every_world_size_th_index_of_the_epoch_permutation():
    n, world_size, seed, epoch = 48, 4, 1, 5
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    union = []
    for rank in range(world_size):
        sampler = ResumableDistributedSampler(n, world_size, rank, seed=seed)
        sampler.set_epoch(epoch)
        indices = [i for i, _ in sampler]
        assert indices == perm[rank::world_size]
        union += indices
    assert sorted(union) == list(range(n))


def test_epochs_are_shuffled_differently():
    sampler = ResumableDistributedSampler(100)
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    assert [i for i, _ in sampler] != [i for i, _ in epoch0]


def test_start_iter_skips_exactly_the_consumed_batches():
    sampler = ResumableDistributedSampler(103, num_replicas=2, rank=1, seed=3)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_epoch(4, start_iter=3, batch_size=8)
    assert list(sampler) == full[24:]
    assert len(sampler) == len(full) - 24
    sampler.set_epoch(5)
    assert len(sampler) == len(full)


def test_start_iter_needs_batch_size_and_must_stay_within_the_epoch():
    sampler = ResumableDistributedSampler(10, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="batch_size"):
        sampler.set_epoch(0, start_iter=1)
    with pytest.raises(ValueError, match="cannot skip"):
        sampler.set_epoch(0, start_iter=2, batch_size=4)


def test_aug_seed_depends_only_on_seed_epoch_and_index():
    n = 40
    seeds_by_index = {}
    for world_size in (1, 2, 4):
        for rank in range(world_size):
            sampler = ResumableDistributedSampler(n, world_size, rank, seed=11)
            sampler.set_epoch(2)
            for index, aug_seed in sampler:
                assert aug_seed == augmentation_seed(11, 2, index)
                assert seeds_by_index.setdefault(index, aug_seed) == aug_seed
    assert len(set(seeds_by_index.values())) == n
    assert all(0 <= s < 2**63 for s in seeds_by_index.values())
    assert augmentation_seed(11, 3, 0) != augmentation_seed(11, 2, 0) != augmentation_seed(12, 2, 0)


# ---------------------------------------------------------------- image discovery and loading

def image_names(root):
    images = open_images(str(root), labelled=False)
    return [images.name(i) for i in range(len(images))]


def test_find_images_accepts_imagenet_class_and_flat_layouts(tmp_path):
    save_images(tmp_path / "imagenet" / "train" / "n01", ["b.JPEG", "a.jpg"])
    save_images(tmp_path / "imagenet" / "train" / "n02", ["c.png"])
    save_images(tmp_path / "imagenet" / "val" / "n01", ["v.jpg"])
    assert image_names(tmp_path / "imagenet") == [
        str(tmp_path / "imagenet" / "train" / p) for p in ("n01/a.jpg", "n01/b.JPEG", "n02/c.png")]

    save_images(tmp_path / "classes" / "cat", ["x.bmp"])
    save_images(tmp_path / "classes" / "dog", ["y.webp"])
    assert image_names(tmp_path / "classes") == [
        str(tmp_path / "classes" / p) for p in ("cat/x.bmp", "dog/y.webp")]

    save_images(tmp_path / "flat", ["2.jpeg", "1.png", "._1.png", "3.TIF"])
    (tmp_path / "flat" / "notes.txt").write_text("not an image")
    save_images(tmp_path / "flat" / ".thumbnails", ["1.png", "2.png"])  # hidden: skipped
    save_images(tmp_path / "flat" / "more", ["4.png"])  # a sub-folder's images are the folder's too
    assert image_names(tmp_path / "flat") == [str(tmp_path / "flat" / p)
                                              for p in ("1.png", "2.jpeg", "3.TIF", "more/4.png")]


def test_find_images_rejects_folder_without_images(tmp_path):
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "empty"))):
        open_images(str(tmp_path / "empty"), labelled=False)


def test_corrupt_image_error_names_the_file(tmp_path):
    save_images(tmp_path, ["good.png"])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(OSError, match="bad.jpg"):
        check_images(FolderImages([str(tmp_path / "good.png"), str(bad)]))


def test_an_unreadable_training_image_is_replaced_by_the_next_readable_one_and_counted(tmp_path, capsys):
    save_images(tmp_path, ["0.png", "2.png", "3.png"])
    (tmp_path / "1.png").write_bytes(b"truncated")
    dataset = PretrainDataset(open_images(str(tmp_path), labelled=False), mae_transform(16))
    assert torch.equal(dataset[(1, 7)], dataset[(2, 7)])  # image 2, with image 1's augmentation
    assert f"WARNING: cannot read image file {tmp_path / '1.png'}" in capsys.readouterr().err
    assert check_unreadable(dataset, images=1000, max_fraction=0.001) == 1  # 1 of 1000 is allowed ...
    dataset[(1, 7)], dataset[(1, 7)]
    with pytest.raises(SystemExit, match=r"2 of 1000 images could not be read \(more than --max_unreadable 0.001\)"):
        check_unreadable(dataset, images=1000, max_fraction=0.001)  # ... 2 are not


def test_16_bit_and_float_greyscale_keep_their_grey_levels(tmp_path):
    levels = np.arange(151)
    Image.fromarray((levels * 257).astype(np.uint16)[None]).save(tmp_path / "16bit.png")
    Image.fromarray((levels / 255).astype(np.float32)[None]).save(tmp_path / "float.tif")
    for name in ("16bit.png", "float.tif"):
        pixels = np.asarray(load_image(str(tmp_path / name)))
        assert pixels.shape == (1, 151, 3) and pixels[0, :, 0].tolist() == levels.tolist()
    Image.fromarray(np.full((2, 2), 3.5, np.float32)).save(tmp_path / "hdr.tif")
    with pytest.raises(OSError, match=r"hdr.tif: float pixels in \[3.5, 3.5\]: only \[0, 1\] is read"):
        load_image(str(tmp_path / "hdr.tif"))


def test_check_images_decodes_first_and_last_when_sampling(tmp_path):
    save_images(tmp_path, [f"{i:02d}.png" for i in range(9)])
    (tmp_path / "99.png").write_bytes(b"truncated")
    with pytest.raises(OSError, match="99.png"):
        check_images(open_images(str(tmp_path), labelled=False), max_files=3)


# ---------------------------------------------------------------- demo data

def test_make_demo_data_writes_balanced_imagefolder(demo):
    for split, per_class in (("train", 300), ("val", 100)):
        classes = sorted(os.listdir(demo / split))
        assert len(classes) == 10 and "t-shirt_top" in classes and "ankle_boot" in classes
        assert all(len(os.listdir(demo / split / c)) == per_class for c in classes)
    img = Image.open(next((demo / "val" / "trouser").iterdir()))
    assert img.mode == "RGB" and img.size == (28, 28)


def test_make_demo_data_is_idempotent(demo):
    before = os.stat(demo / "train" / "bag").st_mtime_ns
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_demo_data.py"), "--out", str(demo)],
                            check=True, capture_output=True, text=True)
    assert "skipping" in result.stdout
    assert os.stat(demo / "train" / "bag").st_mtime_ns == before


def test_demo_data_feeds_pretraining_and_classification(demo):
    assert len(open_images(str(demo), labelled=False)) == 3000
    val = build_labelled(str(demo), "val", eval_transform(32))
    assert len(val) == 1000 and len(val.classes) == 10
    x, label = val[0]
    assert x.shape == (3, 32, 32) and val.classes[label] == "ankle_boot"


def test_batches_do_not_depend_on_num_workers(tmp_path):
    save_images(tmp_path, [f"{i}.png" for i in range(8)])
    ds = PretrainDataset(open_images(str(tmp_path), labelled=False), LUTTwoViews(16))
    sampler = ResumableDistributedSampler(len(ds), seed=5)
    sampler.set_epoch(1)
    batches = [list(torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler, num_workers=w)) for w in (0, 2)]
    assert len(batches[0]) == len(batches[1]) == 2
    for (a1, a2, a_params), (b1, b2, b_params) in zip(*batches):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)
        assert all(torch.equal(a_params[key], b_params[key]) for key in a_params)


# ---------------------------------------------------------------- shared resize and reduced-scale JPEG decoding

def photo(width, height, path):
    """A smooth RGB image (bicubically enlarged noise) saved as a JPEG, so resampling differs little, as in photos."""
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (height // 25, width // 25, 3), dtype=np.uint8))
    small.resize((width, height), Image.BICUBIC).save(path, quality=90)
    return str(path)


def test_shared_resize_and_padding_give_the_views_of_torchvision_pil_crop_per_view(tmp_path):
    img = load_image(photo(300, 200, tmp_path / "a.jpg"))
    views = LUTTwoViews(64)
    per_view = T.Compose([T.Resize(64, interpolation=BICUBIC), T.RandomCrop(64, padding=4, padding_mode="reflect"),
                          T.RandomHorizontalFlip(), T.PILToTensor()])
    for seed in range(8):
        torch.manual_seed(seed)
        got = views(img)
        torch.manual_seed(seed)
        want = per_view(img), per_view(img)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_fast_decode_scales_jpegs_down_while_the_shorter_side_stays_above_the_crop(tmp_path):
    big, small = photo(1000, 800, tmp_path / "big.jpg"), photo(500, 375, tmp_path / "small.jpg")
    Image.open(big).save(tmp_path / "big.png")
    assert load_image(big, draft_size=224).size == (500, 400)  # 1/4 would give a 200-pixel side
    assert load_image(big, draft_size=96).size == (125, 100)  # 1/8
    assert load_image(small, draft_size=224).size == (500, 375)  # 1/2 would give 188 < 224
    assert load_image(str(tmp_path / "big.png"), draft_size=224).size == (1000, 800)  # not a JPEG: unchanged
    assert load_image(big).size == (1000, 800)


def test_fast_decode_changes_the_views_only_slightly(tmp_path):
    path = photo(1000, 800, tmp_path / "big.jpg")
    full, fast = (PretrainDataset(FolderImages([path]), LUTTwoViews(224), draft_size=size) for size in (None, 224))
    for seed in range(3):
        for a, b in zip(full[(0, seed)][:2], fast[(0, seed)][:2]):
            assert a.shape == b.shape
            a, b = normalize(a), normalize(b)
            # normalised units (one 8-bit level is about 0.017): small resampling differences, same crop and flip
            assert (a - b).abs().mean() < 0.05
            assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.98


@pytest.mark.parametrize("input_size, resize", [(224, 256), (112, 128), (384, 384), (448, 448)])
def test_evaluation_view_resizes_as_mae_then_centre_crops(input_size, resize):
    """MAE's rule: crop ratio 224/256 up to 224 px, 1 above (a 384 px model sees a 384 resize, no border cut)."""
    img = random_image(300, 400)
    expected = T.Compose([T.Resize(resize, interpolation=BICUBIC), T.CenterCrop(input_size), T.ToTensor(),
                          T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])(img)
    assert torch.equal(normalize(eval_transform(input_size)(img)), expected)
