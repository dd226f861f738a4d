"""Weighted k-NN classification on frozen, L2-normalised features, as DINO reports it (k = 20, temperature 0.07).

Each validation image votes over its k most cosine-similar training images, each weighted by exp(similarity /
temperature); the class with the largest vote wins. No training, so it tracks representation quality cheaply."""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from util.augment import eval_transform, normalize
from util.datasets import labelled_splits, rank_shard
from util.dist import all_reduce_sum, autocast, get_rank, get_world_size


@torch.no_grad()
def extract_features(model, loader, device, pool="token", amp="none"):
    """L2-normalised features [N, D] (float32) and labels [N] of every (image, label) batch of `loader`: the CLS
    token ('token') or the mean of the patch tokens ('avg', LUT's global vector) after the encoder's final norm."""
    if pool not in ("token", "avg"):
        raise ValueError(f"pool must be 'token' or 'avg', got {pool!r}")
    # a pre-training model or a models_vit classifier built with its final norm: [B, 3, H, W] -> [B, 1 + L, D]
    encode = model.forward_encoder if hasattr(model, "forward_encoder") else model.forward_features
    features, labels = [], []
    for images, targets in loader:
        with autocast(device, amp):
            tokens = encode(normalize(images.to(device, non_blocking=True)))
        pooled = tokens[:, 0] if pool == "token" else tokens[:, 1:].mean(dim=1)
        features.append(F.normalize(pooled.float(), dim=-1))
        labels.append(targets.to(device, non_blocking=True))
    return torch.cat(features), torch.cat(labels)


def gather_shards(x, total):
    """Rows of every rank's shard in dataset order, on every rank; rank r holds rows r, r + W, r + 2W, ... of the
    `total` rows (W = world size). Shards may differ in length by one."""
    world = get_world_size()
    if world == 1:
        return x
    padded = x.new_zeros((-(-total // world), *x.shape[1:]))
    padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.stack(parts, dim=1).flatten(0, 1)[:total]  # row s * W + r is row s of rank r


@torch.no_grad()
def knn_scores(train_features, train_labels, test_features, num_classes, k=20, temperature=0.07, chunk_size=1024):
    """Class votes [N_test, num_classes]: each test row sums exp(cos / temperature) over its k nearest training rows.

    train_features [N_train, D] and test_features [N_test, D] L2-normalised; train_labels [N_train]. Test rows go in
    chunks so the similarity matrix stays chunk_size x N_train."""
    k = min(k, len(train_features))
    scores = []
    for chunk in test_features.split(chunk_size):
        sims, idx = (chunk @ train_features.T).topk(k, dim=1)
        votes = torch.zeros(len(chunk), num_classes, device=chunk.device)
        scores.append(votes.scatter_add_(1, train_labels[idx], (sims / temperature).exp()))
    return torch.cat(scores)


def knn_hits(scores, labels):
    """Top-1 and top-5 hit counts (0-d tensors) of class scores [N, C] against labels [N]."""
    hits = scores.topk(min(5, scores.shape[1]), dim=1).indices == labels[:, None]
    return hits[:, 0].sum(), hits.any(dim=1).sum()


class KNNEvaluator:
    """k-NN accuracy of a frozen encoder on `data_path`'s labelled val split, its train split being the memory bank
    (util.sources.open_images; columns: its image_column, label_column), both read with the evaluation view; a
    missing split fails at construction. Every rank extracts the features of its
    shard, the bank is gathered on every rank and hit counts are summed: the result does not depend on the ranks."""

    def __init__(self, data_path, input_size, batch_size=256, num_workers=8, k=20, temperature=0.07, pool="token",
                 columns=None):
        transform = eval_transform(input_size)
        try:
            sets, self.num_classes = labelled_splits(data_path, {"train": transform, "val": transform},
                                                     **(columns or {}))
        except (OSError, ValueError) as e:
            raise ValueError(f"k-NN evaluation needs labelled train and val splits of {data_path}: {e}") from None
        self.train_set, self.val_set = sets["train"], sets["val"]
        self.k, self.temperature, self.pool = k, temperature, pool
        self.loaders = [torch.utils.data.DataLoader(rank_shard(ds, get_rank(), get_world_size()),
                                                    batch_size=batch_size, num_workers=num_workers)
                        for ds in (self.train_set, self.val_set)]
        print(f"k-NN evaluation: {len(self.train_set)} training and {len(self.val_set)} validation images, "
              f"{self.num_classes} classes, k {k}, temperature {temperature}, {pool} features")

    def __call__(self, model, device, amp="none"):
        """dict(knn_top1, knn_top5) in % of `model` (unwrapped) in eval mode, then left in its mode; on every rank."""
        was_training = model.training
        model.eval()
        bank, bank_labels = extract_features(model, self.loaders[0], device, self.pool, amp)
        bank, bank_labels = gather_shards(bank, len(self.train_set)), gather_shards(bank_labels, len(self.train_set))
        features, labels = extract_features(model, self.loaders[1], device, self.pool, amp)
        model.train(was_training)
        scores = knn_scores(bank, bank_labels, features, self.num_classes, self.k, self.temperature)
        hits = all_reduce_sum(torch.stack(knn_hits(scores, labels)).double())
        top1, top5 = (100 * hits / len(self.val_set)).tolist()
        print(f"k-NN (k {self.k}, T {self.temperature}): top-1 {top1:.3f}%, top-5 {top5:.3f}%")
        return dict(knn_top1=top1, knn_top5=top5)
