"""The robustness test sets' fixed data, from their authors: class lists and AlexNet's ImageNet-C errors.

ImageNet-1k's classes are the 1000 WordNet ids in sorted order. ImageNet-R and ImageNet-A use 200 of them each, in
that order (timm ships the three lists); a model's prediction is the argmax over those 200 logits:
  ImageNet-R: Hendrycks et al., "The Many Faces of Robustness" (2021), github.com/hendrycks/imagenet-r (eval.py);
  ImageNet-A: Hendrycks et al., "Natural Adversarial Examples" (2021), github.com/hendrycks/natural-adv-examples.
ImageNet-C: Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and Perturbations"
(ICLR 2019), github.com/hendrycks/robustness: 15 corruptions (and 4 held-out extra ones) at 5 severities; the
corruption error of a model is normalised by AlexNet's top-1 error on the same corruption, averaged over severities."""
import pkgutil

from timm.data import ImageNetInfo


def _timm_synsets(name):
    """A class list timm ships as package data (timm.data/_info, an internal path; tests/test_robustness.py pins the
    lists against the authors')."""
    return pkgutil.get_data("timm.data", f"_info/{name}_synsets.txt").decode().split()


IMAGENET_WNIDS = ImageNetInfo("imagenet-1k").label_names()
IMAGENET_R_WNIDS = _timm_synsets("imagenet_r")
IMAGENET_A_WNIDS = _timm_synsets("imagenet_a")

# AlexNet's top-1 error on each corruption, averaged over the 5 severities (the paper's mCE denominator).
ALEXNET_ERROR = dict(
    gaussian_noise=0.886428, shot_noise=0.894468, impulse_noise=0.922640, defocus_blur=0.819880,
    glass_blur=0.826268, motion_blur=0.785948, zoom_blur=0.798360, snow=0.866816, frost=0.826572, fog=0.819324,
    brightness=0.564592, contrast=0.853204, elastic_transform=0.646056, pixelate=0.717840, jpeg_compression=0.606500,
)
ALEXNET_ERROR_EXTRA = dict(speckle_noise=0.845388, gaussian_blur=0.787108, spatter=0.717512, saturate=0.658248)
CORRUPTIONS, EXTRA_CORRUPTIONS = list(ALEXNET_ERROR), list(ALEXNET_ERROR_EXTRA)
SEVERITIES = [1, 2, 3, 4, 5]
