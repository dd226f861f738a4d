"""Image augmentations for pre-training (docs/method.md, section 5) and evaluation.

RGB PIL image -> uint8 tensor [3, input_size, input_size]: a quarter of float32's bytes through the workers' shared
memory, the pin-memory thread and the host-to-GPU copy. `normalize` turns a batch of them into ImageNet-normalised
float32 on the device, exactly as torchvision's ToTensor + Normalize would have in the worker. LUT's view 2 leaves the
worker cropped and flipped, with its photometric parameters; `lut_views_on_device` applies them to the batch with
PIL's own arithmetic (util/photometric.py). Every random choice draws from torch's CPU RNG (never python's `random`),
so PretrainDataset can make each augmentation a pure function of its seed."""
import functools
import math

import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from util.photometric import apply_view2

BICUBIC = T.InterpolationMode.BICUBIC
TO_UINT8 = [T.PILToTensor()]
PAD = 4  # LUT's crop: 4-pixel reflect padding
JITTER_P = 0.8  # view 2's RandomApply(ColorJitter)
BLUR_RADIUS = (0.1, 2.0)  # view 2's Gaussian blur


def normalize(images):
    """uint8 images [..., 3, H, W] on any device -> float32 / 255, minus ImageNet's mean, over its std: bitwise what
    ToTensor + Normalize compute. Float images (timm's fine-tuning transforms normalise in the worker) pass as they
    are."""
    if images.dtype != torch.uint8:
        return images
    mean, std = _mean_std(images.device)
    return images.float().div_(255).sub_(mean).div_(std)


@functools.cache
def _mean_std(device):
    # Made once per device: a tensor from Python numbers is a blocking host-to-device copy on a GPU.
    return (torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(3, 1, 1),
            torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(3, 1, 1))


class LUTTwoViews:
    """The worker half of the two LUT views of one image -> (view1, view2, params): view 1 and view 2 cropped and
    flipped, uint8 [3, input_size, input_size], and view 2's photometric parameters (`draw_view2_params`), which
    `lut_views_on_device` applies to the batch on the device.

    Both views: resize the shorter side to `input_size`, random crop with 4-pixel reflect padding, horizontal flip —
    LUT deliberately avoids RandomResizedCrop. View 1 stays photometrically clean because it is also the
    reconstruction target; view 2 adds colour jitter and one of grayscale / solarize / blur."""

    def __init__(self, input_size):
        self.resize = T.Resize(input_size, interpolation=BICUBIC)
        self.crop_and_flip = T.Compose([T.RandomCrop(input_size), T.RandomHorizontalFlip()])
        self.jitter = T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)

    def __call__(self, img):
        # The resize and the padding are deterministic, so the two views share them: torchvision's
        # RandomCrop(padding=4, padding_mode="reflect") pads and then draws the corner in the padded image, so the
        # pixels and draws are those of each view resizing and padding its own copy, with half the resampling (the
        # largest cost after decoding). torch pads uint8 as it is (torchvision's Pad goes through float32).
        img = F.pad(TF.pil_to_tensor(self.resize(img)), [PAD] * 4, mode="reflect")
        return self.crop_and_flip(img), self.crop_and_flip(img), self.draw_view2_params()

    def draw_view2_params(self):
        """View 2's photometric parameters, drawn with the calls and in the order of torchvision's chain
        RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), then one of Grayscale(3), RandomSolarize(128, p=1)
        and a PIL Gaussian blur of radius uniform in [0.1, 2] chosen by torch.randint(3) — including the draws that
        change nothing (RandomSolarize's coin at p = 1). A dict of tensors, the input of util.photometric.apply_view2:
        jitter (bool), order (ColorJitter's four ops: 0 brightness, 1 contrast, 2 saturation, 3 hue), their factors
        (float32, as drawn), choice (0 grayscale, 1 solarize, 2 blur), radius; identity values where not drawn."""
        jitter = not JITTER_P < torch.rand(1)  # RandomApply skips when p < torch.rand(1)
        order, *factors = torch.arange(4), 1.0, 1.0, 1.0, 0.0
        if jitter:
            j = self.jitter
            order, *factors = T.ColorJitter.get_params(j.brightness, j.contrast, j.saturation, j.hue)
        choice = int(torch.randint(3, ()))
        radius = 0.0
        if choice == 1:
            torch.rand(1)  # RandomSolarize(p=1.0): its coin
        elif choice == 2:
            radius = float(torch.empty(()).uniform_(*BLUR_RADIUS))
        params = dict(zip(("brightness", "contrast", "saturation", "hue"), factors), radius=radius)
        return dict(jitter=torch.tensor(jitter), order=order, choice=torch.tensor(choice),
                    **{key: torch.tensor(value, dtype=torch.float32) for key, value in params.items()})


def pretrain_views_on_device(batch, device):
    """A pre-training batch as the model's normalised views on `device`: [imgs] from mae_transform's batch, [view1,
    view2] from LUTTwoViews' (view1, view2, view 2's photometric parameters), the parameters applied here."""
    if torch.is_tensor(batch):
        return [normalize(batch.to(device, non_blocking=True))]
    return lut_views_on_device(*batch, device)


def lut_views_on_device(view1, view2, params, device):
    """LUTTwoViews' device half for a batch: the copies, view 2's photometric chain (util.photometric.apply_view2,
    PIL's arithmetic), both views normalised."""
    params = {key: value.to(device, non_blocking=True) for key, value in params.items()}
    view2 = apply_view2(view2.to(device, non_blocking=True), params)
    return [normalize(view1.to(device, non_blocking=True)), normalize(view2)]


class RandomResizedCrop(T.RandomResizedCrop):
    """MAE's linear-probe crop: one draw of area and aspect ratio, the box clamped to the image, where torchvision's
    RandomResizedCrop draws up to 10 times until the box fits and then falls back to a centre crop."""

    @staticmethod
    def get_params(img, scale, ratio):
        width, height = TF.get_image_size(img)
        area = width * height * torch.empty(1).uniform_(scale[0], scale[1]).item()
        log_ratio = torch.log(torch.tensor(ratio))
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = min(int(round(math.sqrt(area * aspect))), width)
        h = min(int(round(math.sqrt(area / aspect))), height)
        top = torch.randint(0, height - h + 1, size=(1,)).item()
        left = torch.randint(0, width - w + 1, size=(1,)).item()
        return top, left, h, w


def linprobe_transform(input_size):
    """MAE's linear-probe training view: its RandomResizedCrop (bicubic, scale 0.08-1) + flip."""
    return T.Compose([RandomResizedCrop(input_size, interpolation=BICUBIC), T.RandomHorizontalFlip()] + TO_UINT8)


def mae_transform(input_size):
    """MAE pre-training crop: RandomResizedCrop (bicubic, scale 0.2-1) + flip."""
    return T.Compose([T.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=BICUBIC),
                      T.RandomHorizontalFlip()] + TO_UINT8)


def eval_crop_pct(input_size):
    """MAE's evaluation crop ratio (the LUT authors' too): 224/256 up to 224 px, 1 (no border cut) above."""
    return 224 / 256 if input_size <= 224 else 1.0


def eval_transform(input_size):
    """Resize the shorter side to int(input_size / eval_crop_pct) (bicubic), centre crop input_size."""
    return T.Compose([T.Resize(int(input_size / eval_crop_pct(input_size)), interpolation=BICUBIC),
                      T.CenterCrop(input_size)] + TO_UINT8)
