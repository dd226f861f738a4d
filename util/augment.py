"""Image augmentations for pre-training (docs/method.md, section 5) and evaluation.

All transforms take an RGB PIL image and return float tensors [3, input_size, input_size] normalised with the
ImageNet mean/std. Every random choice draws from torch's global CPU RNG (never python's `random`), so
`util.datasets.PretrainDataset` can make each augmentation a pure function of its seed.
"""
import torch
import torchvision.transforms as T
from PIL import ImageFilter
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

BICUBIC = T.InterpolationMode.BICUBIC


def _to_normalized_tensor():
    return [T.ToTensor(), T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]


class OneOf:
    """Apply exactly one of `transforms`, chosen uniformly.

    torchvision's v1 RandomChoice draws from python's `random`, which the per-sample torch seeding does not control.
    """

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, img):
        choice = int(torch.randint(len(self.transforms), ()))
        return self.transforms[choice](img)

    def __repr__(self):
        return f"{type(self).__name__}({self.transforms})"


class GaussianBlur:
    """PIL Gaussian blur whose radius is drawn uniformly from `sigma` (the BYOL / LUT view-2 blur)."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        radius = float(torch.empty(()).uniform_(*self.sigma))
        return img.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self):
        return f"{type(self).__name__}(sigma={self.sigma})"


class LUTTwoViews:
    """The two LUT views of one image (docs/method.md, section 5).

    Both views: resize the shorter side to `input_size`, random crop with 4-pixel reflect padding, horizontal flip —
    LUT deliberately avoids RandomResizedCrop. View 1 stays photometrically clean because it is also the
    reconstruction target; view 2 adds colour jitter and one of grayscale / solarize / blur.

    Returns (view1, view2), each [3, input_size, input_size].
    """

    def __init__(self, input_size):
        # The resize is deterministic, so the two views share one: the same pixels and random draws as resizing in
        # each view, with half the resampling work (the largest cost after decoding).
        self.resize = T.Resize(input_size, interpolation=BICUBIC)

        def crop_and_flip():
            return [T.RandomCrop(input_size, padding=4, padding_mode="reflect"), T.RandomHorizontalFlip()]

        self.view1 = T.Compose(crop_and_flip() + _to_normalized_tensor())
        self.view2 = T.Compose(crop_and_flip() + [
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            # Threshold 128 (of 255) as in BYOL and the LUT authors' code: pixels >= 128 are inverted.
            OneOf([
                T.Grayscale(num_output_channels=3),
                T.RandomSolarize(threshold=128, p=1.0),
                GaussianBlur(sigma=(0.1, 2.0)),
            ]),
        ] + _to_normalized_tensor())

    def __call__(self, img):
        img = self.resize(img)
        return self.view1(img), self.view2(img)

    def __repr__(self):
        return f"{type(self).__name__}(resize={self.resize}, view1={self.view1}, view2={self.view2})"


def mae_transform(input_size):
    """MAE pre-training crop: RandomResizedCrop(scale 0.2-1, bicubic) + flip -> [3, input_size, input_size]."""
    return T.Compose([
        T.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=BICUBIC),
        T.RandomHorizontalFlip(),
    ] + _to_normalized_tensor())


def eval_transform(input_size):
    """Deterministic evaluation view: resize the shorter side to input_size / 0.875 (bicubic), then center crop."""
    return T.Compose([
        T.Resize(int(input_size / 0.875), interpolation=BICUBIC),
        T.CenterCrop(input_size),
    ] + _to_normalized_tensor())
