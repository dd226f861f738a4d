"""Datasets over util.sources' Images and the resumable sampler. Pre-training augmentations are seeded per sample
from (seed, epoch, index): the batches do not depend on the number of workers or GPUs, and a resume continues
mid-epoch."""
import hashlib
import math
import multiprocessing
import sys

import numpy as np
import torch
from PIL import Image

from util.dist import all_reduce_sum
from util.sources import open_images

def load_image(path, draft_size=None, name=None):
    """8-bit RGB PIL image of a path or file object; an unreadable one raises OSError naming it (`name`, default
    path). 16-bit greyscale is scaled to 8 bits, float greyscale in [0, 1] to 0..255; other float ranges are
    refused, as there is no telling what they mean.
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
        raise OSError(f"cannot read image file {name or path}: {e}") from e


def read_image(images, i, draft_size=None):
    """Sample i of util.sources.Images `images`, decoded by load_image; OSError naming it when it cannot be read."""
    try:
        source = images.open(i)
    except OSError as e:  # e.g. a shard truncated since it was indexed
        raise OSError(f"cannot read image {images.name(i)}: {e}") from e
    return load_image(source, draft_size, images.name(i))


def check_images(images, max_files=16):
    """Fail early on unreadable images: decode up to `max_files` evenly spaced ones, first and last included."""
    for i in np.unique(np.linspace(0, len(images) - 1, num=min(max_files, len(images))).round().astype(int)):
        read_image(images, i)


class UnreadableImages:
    """Replaces an unreadable image by the next readable one (a choice that depends on nothing else, so a resumed
    run loads what the uninterrupted one did), warns, and counts it in memory shared by the workers."""

    def __init__(self, images, draft_size=None):
        self.images, self.draft_size = images, draft_size
        self.count = multiprocessing.Value("q", 0)

    def load(self, index):  # -> (image, index of the image loaded)
        for k in range(len(self.images)):
            i = (index + k) % len(self.images)
            try:
                return read_image(self.images, i, self.draft_size), i
            except OSError as e:
                with self.count.get_lock():
                    self.count.value += 1
                print(f"WARNING: {e}; the next image is used instead", file=sys.stderr, flush=True)
        raise OSError(f"none of the {len(self.images)} images can be read")


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
    """Unlabeled util.sources.Images keyed by `(index, aug_seed)` (ResumableDistributedSampler); returns
    `transform(image)`, whose random draws are seeded by aug_seed. draft_size: see load_image (--fast_decode)."""

    def __init__(self, images, transform, draft_size=None):
        self.images, self.transform = images, transform
        self.unreadable = UnreadableImages(images, draft_size)

    def __len__(self):
        return len(self.images)

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
    keys; with_seeds=False yields plain indices (labelled images, whose timm augmentations are not seeded)."""

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


class LabelledImages(torch.utils.data.Dataset):
    """(transform(image), label) of labelled util.sources.Images; unreadable images are replaced as in
    pre-training: a bad file never crashes an epoch, nor every requeue at the same place."""

    def __init__(self, images, transform):
        self.images, self.transform, self.targets, self.classes = images, transform, images.targets, images.classes
        self.num_classes = len(self.classes) if self.classes else int(self.targets.max()) + 1
        self.unreadable = UnreadableImages(images)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        img, index = self.unreadable.load(index)
        return self.transform(img), int(self.targets[index])


def build_labelled(root, split, transform, image_column=None, label_column=None):
    """The labelled `split` of data path `root` (util.sources.open_images) for fine-tuning, linear probing, k-NN."""
    images = open_images(root, split, labelled=True, image_column=image_column, label_column=label_column)
    if images.targets is None or (images.targets < 0).any():
        raise ValueError(f"{root} {split}: not every image has a label (class folders, <key>.cls members, the "
                         f"names of two or more <class>.tar, or a label column)")
    return LabelledImages(images, transform)


def labelled_splits(root, transforms, image_column=None, label_column=None):
    """({split: LabelledImages} for each split of `transforms` ({split: transform}), their number of classes). A
    ValueError unless the splits have the same class names where both have names (numbered labels have none)."""
    sets = {split: build_labelled(root, split, transform, image_column, label_column)
            for split, transform in transforms.items()}
    named = [s.classes for s in sets.values() if s.classes is not None]
    for names in named[1:]:
        if names != named[0]:
            only = sorted(set(named[0]) ^ set(names))[:3] or ["the same names, in another order"]
            raise ValueError(f"{root}'s {' and '.join(sets)} splits have different classes ({', '.join(only)}...)")
    return sets, max(s.num_classes for s in sets.values())


def rank_shard(dataset, rank, world_size):
    """Items rank, rank + world_size, ... of `dataset`: none padded or repeated (unlike DistributedSampler), so
    counts summed over ranks equal a single-process pass (evaluation)."""
    return torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
