"""util/photometric.py against the PIL ops torchvision's PIL path runs, on natural photographs (scikit-image's data)
and on every 8-bit input where that is cheap: each op, and the whole view-2 chain given the parameters the PIL
chain draws from torch's RNG, match bit for bit."""
import functools
import time

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from syncs import SyncCounter

from util import photometric as P

skimage_data = pytest.importorskip("skimage.data")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
          "colorwheel")
SIZES = ((224, 224), (61, 47), (5, 3))  # (height, width): the training size, odd sizes, one narrower than a box


@functools.lru_cache(maxsize=None)
def photo(name, size):
    """A scikit-image photograph as RGB PIL, its shorter side resized to cover `size` and centre-cropped."""
    img = Image.fromarray(getattr(skimage_data, name)()).convert("RGB")
    return TF.center_crop(TF.resize(img, max(size), interpolation=T.InterpolationMode.BICUBIC), list(size))


def to_tensor(images):
    return torch.stack([torch.from_numpy(np.array(img)).permute(2, 0, 1) for img in images])


def assert_equal(pil_images, out):
    diff = (to_tensor(pil_images).int() - out.int()).abs().double()
    assert torch.equal(diff, torch.zeros_like(diff)), \
        f"mean |diff| {diff.mean():.4f}, p99.9 {diff.flatten().quantile(0.999):.0f}, max {diff.max():.0f}"


def every_colour():
    """All 2**24 RGB triples as one uint8 image [1, 3, 4096, 4096]."""
    levels = torch.arange(256, dtype=torch.uint8)
    return torch.stack(torch.meshgrid(levels, levels, levels, indexing="ij")).reshape(1, 3, 4096, 4096)


def to_pil(img, mode="RGB"):
    return Image.merge(mode, [Image.fromarray(channel.numpy()) for channel in img])


def test_blend_matches_image_blend_on_every_pair_of_levels():
    """Brightness, contrast and saturation are Image.blend with different degenerate images: every (degenerate,
    image) level pair, factors inside and outside [0, 1] (Pillow's clipping branch), float32 as torchvision passes."""
    degenerate, img = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    factors = torch.cat([torch.tensor([0.0, 1.0, 0.5, -0.3, 2.7]), torch.empty(15).uniform_(0.6, 1.4)])
    out = P._blend(degenerate.expand(len(factors), 1, -1, -1), img.expand(len(factors), 1, -1, -1), factors)
    for factor, got in zip(factors.tolist(), out):
        ref = Image.blend(Image.fromarray(degenerate.numpy().astype(np.uint8)),
                          Image.fromarray(img.numpy().astype(np.uint8)), factor)
        assert np.array_equal(np.array(ref), got[0].numpy()), factor


def test_hsv_conversions_match_pil_on_every_input():
    """PIL's 8-bit RGB -> HSV and HSV -> RGB (what adjust_hue runs around its shift) on all 2**24 inputs."""
    colours = every_colour()
    h, s, v = P._rgb_to_hsv(colours)
    assert np.array_equal(np.array(to_pil(colours[0]).convert("HSV")), torch.stack([h, s, v], -1)[0].numpy())
    rgb = P._hsv_to_rgb(*colours.int().unbind(1))
    assert np.array_equal(np.array(to_pil(colours[0], "HSV").convert("RGB")), rgb[0].permute(1, 2, 0).numpy())


def test_grayscale_and_solarize_match_pil_on_every_colour():
    colours = every_colour()
    pil = to_pil(colours[0])
    assert np.array_equal(np.array(TF.rgb_to_grayscale(pil, 3)), P.grayscale(colours)[0].permute(1, 2, 0).numpy())
    assert np.array_equal(np.array(TF.solarize(pil, 128)), P.solarize(colours)[0].permute(1, 2, 0).numpy())


JITTER = {  # op -> (torchvision's PIL op, ours, factor range: the view's and beyond it)
    "brightness": (TF.adjust_brightness, P.adjust_brightness, (0.0, 2.0)),
    "contrast": (TF.adjust_contrast, P.adjust_contrast, (0.0, 2.0)),
    "saturation": (TF.adjust_saturation, P.adjust_saturation, (0.0, 2.0)),
    "hue": (TF.adjust_hue, P.adjust_hue, (-0.5, 0.5)),
}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("op", JITTER)
def test_jitter_ops_match_pil_on_photos(op, size):
    """Each photo with 3 factors: one from the view's range (ColorJitter(0.4, 0.4, 0.2, 0.1)), two from the wider
    range, per sample in one batch."""
    pil_op, ours, (low, high) = JITTER[op]
    view = {"brightness": (0.6, 1.4), "contrast": (0.6, 1.4), "saturation": (0.8, 1.2), "hue": (-0.1, 0.1)}[op]
    generator = torch.Generator().manual_seed(len(op) * 1000 + size[1])
    images = [photo(name, size) for name in PHOTOS for _ in range(3)]
    factors = torch.empty(len(images)).uniform_(low, high, generator=generator)
    factors[::3] = torch.empty(len(PHOTOS)).uniform_(*view, generator=generator)
    assert_equal([pil_op(img, factor) for img, factor in zip(images, factors.tolist())],
                 ours(to_tensor(images), factors))


@pytest.mark.parametrize("size", SIZES)
def test_gaussian_blur_matches_pil_on_photos(size):
    """Radii from the view's range (0.1, 2.0) with its ends, and larger ones whose boxes outgrow the small images."""
    images = [photo(name, size) for name in PHOTOS for _ in range(3)]
    radii = torch.cat([torch.tensor([0.1, 2.0, 5.0, 17.3]), torch.empty(len(images) - 4).uniform_(
        0.1, 2.0, generator=torch.Generator().manual_seed(size[1]))])
    assert_equal([img.filter(ImageFilter.GaussianBlur(radius)) for img, radius in zip(images, radii.tolist())],
                 P.gaussian_blur(to_tensor(images), radii))


@pytest.mark.parametrize("size", SIZES[:2])
def test_grayscale_and_solarize_match_pil_on_photos(size):
    images = [photo(name, size) for name in PHOTOS]
    assert_equal([TF.rgb_to_grayscale(img, 3) for img in images], P.grayscale(to_tensor(images)))
    assert_equal([TF.solarize(img, 128) for img in images], P.solarize(to_tensor(images)))


class OneOf(T.RandomChoice):
    """util/augment.py's OneOf and GaussianBlur as they were when the chain ran in PIL, kept here as the reference."""

    def __call__(self, img):
        return self.transforms[int(torch.randint(len(self.transforms), ()))](img)


def pil_blur(img):
    return img.filter(ImageFilter.GaussianBlur(radius=float(torch.empty(()).uniform_(0.1, 2.0))))


PIL_VIEW2 = T.Compose([  # LUTTwoViews' view 2 after crop and flip, before ToTensor
    T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
    OneOf([T.Grayscale(num_output_channels=3), T.RandomSolarize(threshold=128, p=1.0), pil_blur]),
])


def draw_view2_params():
    """The torch RNG draws PIL_VIEW2 makes, in its order, as apply_view2's parameters of one sample."""
    jitter = bool(torch.rand(1) <= 0.8)  # RandomApply: skipped when p < torch.rand(1)
    params = {"jitter": torch.tensor(jitter), "order": torch.arange(4), "brightness": torch.tensor(1.0),
              "contrast": torch.tensor(1.0), "saturation": torch.tensor(1.0), "hue": torch.tensor(0.0)}
    if jitter:  # ColorJitter.get_params: the permutation, then each factor as torch.empty(1).uniform_
        params["order"] = torch.randperm(4)
        for name, (low, high) in zip(("brightness", "contrast", "saturation", "hue"),
                                     ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))):
            params[name] = torch.empty(1).uniform_(low, high)[0]
    params["choice"] = torch.randint(3, ())
    params["radius"] = torch.tensor(0.0)
    if params["choice"] == 1:
        torch.rand(1)  # RandomSolarize(p=1.0) still draws its coin
    elif params["choice"] == 2:
        params["radius"] = torch.empty(()).uniform_(0.1, 2.0)
    return params


def stack(params):
    return {key: torch.stack([p[key] for p in params]) for key in params[0]}


@pytest.mark.parametrize("size", SIZES)
def test_view2_matches_the_pil_chain_given_its_draws(size):
    """Seeded, the PIL chain and draw_view2_params make the same draws; apply_view2 on the batch of all samples
    equals the PIL chain on each. The seeds cover every one-of branch with and without jitter."""
    images, params, refs = [], [], []
    for seed in range(48 if size == (224, 224) else 96):
        img = photo(PHOTOS[seed % len(PHOTOS)], size)
        torch.manual_seed(seed)
        refs.append(PIL_VIEW2(img))
        torch.manual_seed(seed)
        params.append(draw_view2_params())
        images.append(img)
    params = stack(params)
    assert {(bool(j), int(c)) for j, c in zip(params["jitter"], params["choice"])} == \
        {(j, c) for j in (False, True) for c in range(3)}
    assert_equal(refs, P.apply_view2(to_tensor(images), params))


def random_batch(n=6, size=(33, 41)):
    """Different photos, and parameters spanning every branch (each sample's own draws)."""
    torch.manual_seed(0)
    return to_tensor([photo(PHOTOS[i % len(PHOTOS)], size) for i in range(n)]), stack(
        [draw_view2_params() for _ in range(n)])


def ops(img, params):
    yield P.adjust_brightness(img, params["brightness"])
    yield P.adjust_contrast(img, params["contrast"])
    yield P.adjust_saturation(img, params["saturation"])
    yield P.adjust_hue(img, params["hue"])
    yield P.grayscale(img)
    yield P.solarize(img)
    yield P.gaussian_blur(img, params["radius"] + 0.7)
    yield P.apply_view2(img, params)


def test_a_batch_equals_its_samples_one_by_one():
    img, params = random_batch()
    singles = [list(ops(img[i:i + 1], {k: v[i:i + 1] for k, v in params.items()})) for i in range(len(img))]
    for k, batched in enumerate(ops(img, params)):
        assert torch.equal(batched, torch.cat([single[k] for single in singles])), k


def test_no_host_sync():
    img, params = random_batch()
    with SyncCounter() as counter:
        list(ops(img, params))
    assert not counter.syncs, counter.report()


PIL_LUT_VIEWS = (  # LUTTwoViews as torchvision's PIL pipeline: the shared resize, then each view's chain
    T.Compose([T.RandomCrop(64, padding=4, padding_mode="reflect"), T.RandomHorizontalFlip()]),
    T.Compose([T.RandomCrop(64, padding=4, padding_mode="reflect"), T.RandomHorizontalFlip(), PIL_VIEW2]))


def test_lut_views_and_their_device_half_equal_torchvision_pil_pipeline_for_every_seed():
    """The worker half (crops, flips, parameters drawn from the seeded generator) and lut_views_on_device give
    bitwise the normalised views of torchvision's PIL pipeline with the same seed."""
    from util.augment import LUTTwoViews, lut_views_on_device, normalize
    views = LUTTwoViews(64)
    samples, refs = [], []
    for seed in range(60):
        img = photo(PHOTOS[seed % len(PHOTOS)], (96, 80))
        torch.manual_seed(seed)
        samples.append(views(img))
        resized = TF.resize(img, 64, interpolation=T.InterpolationMode.BICUBIC)
        torch.manual_seed(seed)
        refs.append([to_tensor([pipeline(resized)])[0] for pipeline in PIL_LUT_VIEWS])
    batch = torch.utils.data.default_collate(samples)
    got = lut_views_on_device(*batch, torch.device("cpu"))
    for k in range(2):
        assert torch.equal(got[k], normalize(torch.stack([ref[k] for ref in refs]))), k


def authors_two_views(input_size):
    """The LUT authors' two-view pipeline: each view resizes, crops and flips, view 2 runs the PIL chain, both become
    normalised float32 in the worker."""
    def view(*photometric):
        return T.Compose([T.Resize(input_size, interpolation=T.InterpolationMode.BICUBIC),
                          T.RandomCrop(input_size, padding=4, padding_mode="reflect"), T.RandomHorizontalFlip(),
                          *photometric, T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    views = view(), view(PIL_VIEW2)
    return lambda img: [v(img) for v in views]


def test_one_lut_worker_makes_at_least_twice_the_authors_two_view_images_per_second(tmp_path):
    """One torch thread, as a DataLoader worker has, on 500 x 375 JPEGs of scikit-image's photographs; the best of
    three interleaved passes of each pipeline."""
    from util.augment import LUTTwoViews
    from util.datasets import PretrainDataset
    from util.sources import FolderImages
    paths = []
    for i, name in enumerate(PHOTOS * 3):
        paths.append(str(tmp_path / f"{i}.jpg"))
        photo(name, (375, 500)).save(paths[-1], quality=90)
    images = FolderImages(paths)
    pipelines = {"ours": PretrainDataset(images, LUTTwoViews(224)), "authors": PretrainDataset(images,
                                                                                              authors_two_views(224))}
    best = dict.fromkeys(pipelines, float("inf"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(3):
            for name, dataset in pipelines.items():
                start = time.perf_counter()
                for i in range(len(dataset)):
                    dataset[(i, i)]
                best[name] = min(best[name], time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    print(f"authors / ours: {best['authors'] / best['ours']:.2f}", best)
    assert best["authors"] / best["ours"] >= 2, best
