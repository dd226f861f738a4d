"""Image lists, datasets and the resumable sampler. Pre-training augmentations are seeded per sample from (seed,
epoch, index): the batches do not depend on the number of workers or GPUs, and a resume continues mid-epoch."""
import hashlib
import math
import multiprocessing
import os
import sys

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from util.dist import all_reduce_sum

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def is_image_file(path):
    name = os.path.basename(path)  # hidden files such as macOS `._x.jpg` are skipped
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def find_images(root):
    """Sorted image paths of root/train if it exists, else of root: those directly in it and one level deep (class
    folders), hidden files and folders excepted. Labels are ignored."""
    if not os.path.exists(root):
        raise FileNotFoundError(f"data path {root} does not exist")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"data path {root} is not a folder")
    folder = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else root
    folders = [folder] + [e.path for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")]
    paths = sorted(e.path for d in folders for e in os.scandir(d) if e.is_file() and is_image_file(e.name))
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {folder} or its sub-folders")
    return paths


def load_image(path, draft_size=None):
    """8-bit RGB PIL image; an unreadable file raises OSError naming it. 16-bit greyscale is scaled to 8 bits, float
    greyscale in [0, 1] to 0..255; other float ranges are refused, as there is no telling what they mean.
    draft_size: let the JPEG decoder scale down by 1/2, 1/4 or 1/8 (in the DCT domain) while both sides stay
    >= draft_size: several times faster for large photos, the pixels differing slightly from a full decode + resize."""
    try:
        with Image.open(path) as img:
            if draft_size is not None:
                img.draft("RGB", (draft_size, draft_size))
            if img.mode.startswith("I"):  # 16- or 32-bit integers: convert("RGB") would clip them to 0 / 255
                pixels = np.asarray(img, dtype=np.float64)
                if pixels.min() < 0 or pixels.max() > 65535:
                    raise ValueError(f"{img.mode} pixels in [{pixels.min():g}, {pixels.max():g}], not 16-bit")
                img = Image.fromarray(np.round(pixels / 257).astype(np.uint8))
            elif img.mode == "F":
                pixels = np.asarray(img, dtype=np.float64)
                if not (np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1):
                    raise ValueError(f"float pixels in [{pixels.min():g}, {pixels.max():g}]: only [0, 1] is read; "
                                     f"save the image with 8 bits per channel")
                img = Image.fromarray(np.round(pixels * 255).astype(np.uint8))
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise OSError(f"cannot read image file {path}: {e}") from e


def check_images(paths, max_files=16):
    """Fail early on unreadable images: decode up to `max_files` evenly spaced ones, first and last included."""
    for i in np.unique(np.linspace(0, len(paths) - 1, num=min(max_files, len(paths))).round().astype(int)):
        load_image(paths[i])


class UnreadableImages:
    """Replaces an unreadable image by the next readable one of the list (a choice that depends on nothing else, so
    a resumed run loads what the uninterrupted one did), warns, and counts it in memory shared by the workers."""

    def __init__(self, paths, draft_size=None):
        self.paths, self.draft_size = paths, draft_size
        self.count = multiprocessing.Value("q", 0)

    def load(self, index):  # -> (image, index of the image loaded)
        for k in range(len(self.paths)):
            i = (index + k) % len(self.paths)
            try:
                return load_image(self.paths[i], self.draft_size), i
            except OSError as e:
                with self.count.get_lock():
                    self.count.value += 1
                print(f"WARNING: {e}; the next image is used instead", file=sys.stderr, flush=True)
        raise OSError(f"none of the {len(self.paths)} images can be read")


def check_unreadable(dataset, images, max_fraction):
    """Unreadable images met by `dataset` since the last call, summed over ranks (a collective); stops the run when
    they are more than max_fraction of `images` (of all ranks)."""
    with dataset.unreadable.count.get_lock():
        count, dataset.unreadable.count.value = dataset.unreadable.count.value, 0
    count = int(all_reduce_sum(float(count)))
    if count > max_fraction * images:
        raise SystemExit(f"{count} of {images} images could not be read (more than --max_unreadable {max_fraction}); "
                         f"the warnings above name them: fix or remove them")
    return count


class PretrainDataset(torch.utils.data.Dataset):
    """Unlabeled images keyed by `(index, aug_seed)` (ResumableDistributedSampler); returns `transform(image)`, whose
    random draws are seeded by aug_seed. draft_size: see load_image (--fast_decode)."""

    def __init__(self, paths, transform, draft_size=None):
        self.paths, self.transform = list(paths), transform
        self.unreadable = UnreadableImages(self.paths, draft_size)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        index, aug_seed = key
        img, _ = self.unreadable.load(index)
        # Seed only the CPU generator inside a fork: torch.manual_seed would also reseed CUDA generators (used for
        # masking in the main process when num_workers=0), and the caller's RNG stream must not depend on the data.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(aug_seed)
            return self.transform(img)


def augmentation_seed(seed, epoch, index):
    """Seed in [0, 2**63) for the augmentation of sample `index` in `epoch`; depends on nothing else."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ResumableDistributedSampler(torch.utils.data.Sampler):
    """torch's DistributedSampler index split (permutation from seed + epoch, rank r takes perm[r::num_replicas],
    the tail dropped or padded by repeating the start), able to resume mid-epoch and yielding `(index, aug_seed)`
    keys; with_seeds=False yields plain indices (labelled ImageFolders, whose timm augmentations are not seeded)."""

    def __init__(self, dataset_len, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True, with_seeds=True):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.dataset_len, self.num_replicas, self.rank = dataset_len, num_replicas, rank
        self.shuffle, self.seed, self.with_seeds = shuffle, seed, with_seeds
        self.num_samples = dataset_len // num_replicas if drop_last else math.ceil(dataset_len / num_replicas)
        self.epoch = self.start = 0

    def set_epoch(self, epoch, start_iter=0, batch_size=None):
        """Select the epoch; `start_iter` batches of `batch_size` already consumed on this rank are skipped."""
        if start_iter and batch_size is None:
            raise ValueError("set_epoch needs batch_size to skip start_iter batches")
        start = start_iter * (batch_size or 0)
        if start > self.num_samples:
            raise ValueError(f"cannot skip {start} samples: this rank has only {self.num_samples} per epoch")
        self.epoch, self.start = epoch, start

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            indices = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            indices = list(range(self.dataset_len))
        total = self.num_samples * self.num_replicas
        indices = (indices * math.ceil(total / len(indices)))[:total]
        mine = indices[self.rank:total:self.num_replicas][self.start:]
        return iter([(i, augmentation_seed(self.seed, self.epoch, i)) for i in mine] if self.with_seeds else mine)

    def __len__(self):
        return self.num_samples - self.start


class LabelledImageFolder(ImageFolder):
    """ImageFolder whose unreadable images are replaced as in pre-training: a bad file never crashes an epoch, nor
    every requeue at the same place."""

    def __init__(self, folder, transform):
        super().__init__(folder, transform=transform, loader=load_image, is_valid_file=is_image_file)
        self.unreadable = UnreadableImages([path for path, _ in self.samples])

    def __getitem__(self, index):
        img, index = self.unreadable.load(index)
        return self.transform(img), self.targets[index]


def build_imagefolder(root, split, transform):
    """Labelled `root/<split>/<class>/<image>` dataset for fine-tuning, linear probing and k-NN."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"data path {folder} does not exist (expected {root}/{split}/<class>/<images>)")
    return LabelledImageFolder(folder, transform)


def rank_shard(dataset, rank, world_size):
    """Items rank, rank + world_size, ... of `dataset`: none padded or repeated (unlike DistributedSampler), so
    counts summed over ranks equal a single-process pass (evaluation)."""
    return torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
