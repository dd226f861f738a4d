"""Weighted k-NN classification on frozen, L2-normalised features, as DINO reports it (k = 20, temperature 0.07).

Each validation image votes over its k most cosine-similar training images, each neighbour weighted by
exp(similarity / temperature); the class with the largest vote wins. No training, so it tracks representation
quality cheaply — during pre-training too (main_pretrain.py --knn_freq):

    knn = KNNEvaluator(args.data_path, args.input_size, args.batch_size, args.num_workers)  # fails early
    ...
    stats.update(knn(student, device, args.amp))  # every rank calls it: {'knn_top1': %, 'knn_top5': %}
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from util.augment import eval_transform
from util.datasets import build_imagefolder, rank_shard
from util.dist import all_reduce_sum, autocast, get_rank, get_world_size


def pool_tokens(tokens, pool):
    """tokens: [B, 1 + L, D], CLS first, after the encoder's final norm -> [B, D]: the CLS token ('token') or the
    mean of the patch tokens ('avg', LUT's global vector)."""
    if pool == "token":
        return tokens[:, 0]
    if pool == "avg":
        return tokens[:, 1:].mean(dim=1)
    raise ValueError(f"pool must be 'token' or 'avg', got {pool!r}")


def encoder_tokens(model):
    """The function images [B, 3, H, W] -> tokens [B, 1 + L, D] of a pre-training model (forward_encoder) or of a
    models_vit classifier built with its final norm (forward_features)."""
    return model.forward_encoder if hasattr(model, "forward_encoder") else model.forward_features


@torch.no_grad()
def extract_features(model, loader, device, pool="token", amp="none"):
    """L2-normalised features [N, D] (float32) and labels [N] of every (image, label) batch of `loader`."""
    encode = encoder_tokens(model)
    features, labels = [], []
    for images, targets in loader:
        with autocast(device, amp):
            tokens = encode(images.to(device, non_blocking=True))
        features.append(F.normalize(pool_tokens(tokens, pool).float(), dim=-1))
        labels.append(targets.to(device, non_blocking=True))
    return torch.cat(features), torch.cat(labels)


def gather_shards(x, total):
    """Rows of every rank's shard in dataset order, on every rank; rank r holds rows r, r + W, r + 2W, ... of the
    `total` rows (W = world size). Shards may differ in length by one."""
    world = get_world_size()
    if world == 1:
        return x
    size = -(-total // world)
    padded = x.new_zeros((size, *x.shape[1:]))
    padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = x.new_empty((total, *x.shape[1:]))
    for r, part in enumerate(parts):
        out[r::world] = part[:len(range(r, total, world))]
    return out


@torch.no_grad()
def knn_scores(train_features, train_labels, test_features, num_classes, k=20, temperature=0.07, chunk_size=1024):
    """Class votes [N_test, num_classes] of weighted k-NN.

    train_features: [N_train, D], test_features: [N_test, D], both L2-normalised; train_labels: [N_train] (int).
    Each test row sums exp(cos / temperature) over its k nearest training rows, per class. Test rows are processed
    in chunks so the similarity matrix stays chunk_size x N_train.
    """
    k = min(k, len(train_features))
    scores = []
    for chunk in test_features.split(chunk_size):
        sims, idx = (chunk @ train_features.T).topk(k, dim=1)
        votes = torch.zeros(len(chunk), num_classes, device=chunk.device)
        votes.scatter_add_(1, train_labels[idx], (sims / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def knn_hits(scores, labels):
    """Top-1 and top-5 hit counts (0-d tensors) of class scores [N, C] against labels [N]."""
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return hits[:, 0].sum(), hits.any(dim=1).sum()


class KNNEvaluator:
    """k-NN accuracy of a frozen encoder on `data_path/val`, with `data_path/train` as the labelled memory bank.

    Both folders are ImageFolders with the same classes, read with the deterministic evaluation view
    (util.augment.eval_transform). Under torch.distributed every rank extracts the features of its shard, the bank
    is gathered on every rank and hit counts are summed: the result does not depend on the number of ranks.
    """

    def __init__(self, data_path, input_size, batch_size=256, num_workers=8, k=20, temperature=0.07, pool="token"):
        transform = eval_transform(input_size)
        try:
            self.train_set = build_imagefolder(data_path, "train", transform)
            self.val_set = build_imagefolder(data_path, "val", transform)
        except (OSError, ValueError) as e:  # ImageFolder raises FileNotFoundError for a folder with no images
            raise ValueError(f"k-NN evaluation needs labelled {data_path}/train/<class>/ and "
                             f"{data_path}/val/<class>/ folders: {e}") from None
        if self.train_set.classes != self.val_set.classes:
            raise ValueError(f"{data_path}/train and {data_path}/val have different class folders")
        self.num_classes = len(self.train_set.classes)
        self.k, self.temperature, self.pool = k, temperature, pool
        self.loaders = [torch.utils.data.DataLoader(rank_shard(ds, get_rank(), get_world_size()),
                                                    batch_size=batch_size, num_workers=num_workers)
                        for ds in (self.train_set, self.val_set)]
        print(f"k-NN evaluation: {len(self.train_set)} training and {len(self.val_set)} validation images, "
              f"{self.num_classes} classes, k {k}, temperature {temperature}, {pool} features")

    def __call__(self, model, device, amp="none"):
        """Accuracy (%) of `model` (a pre-training model or a models_vit classifier, unwrapped); every rank must
        call it. The model is evaluated in eval mode and left in the mode it was in. Returns dict(knn_top1, knn_top5).
        """
        was_training = model.training
        model.eval()
        train_loader, val_loader = self.loaders
        bank, bank_labels = extract_features(model, train_loader, device, self.pool, amp)
        bank, bank_labels = gather_shards(bank, len(self.train_set)), gather_shards(bank_labels, len(self.train_set))
        features, labels = extract_features(model, val_loader, device, self.pool, amp)
        model.train(was_training)
        scores = knn_scores(bank, bank_labels, features, self.num_classes, self.k, self.temperature)
        hits = all_reduce_sum(torch.stack(knn_hits(scores, labels)).double())
        top1, top5 = (100 * hits / len(self.val_set)).tolist()
        print(f"k-NN (k {self.k}, T {self.temperature}): top-1 {top1:.3f}%, top-5 {top5:.3f}%")
        return dict(knn_top1=top1, knn_top5=top5)
