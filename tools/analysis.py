"""Shared helpers of the analysis and export tools. Plots need matplotlib (optional); numbers and JSON only torch."""
import argparse
import contextlib
import importlib
import json
import os
import sys

import numpy as np
import torch
import torchvision
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

# The tools run as scripts from anywhere and import this module first: put the repository root on the path for them.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models_lut  # noqa: E402
from util.augment import eval_transform, normalize  # noqa: E402
from util.checkpoint import load_checkpoint, normalize_pretrained, saved_args  # noqa: E402
from util.datasets import read_image  # noqa: E402
from util.sources import open_images  # noqa: E402

# LUT's projector and predictor: the tools look at the encoder (and decoder) only.
HEAD_PREFIXES = ("head.", "predictor.")
DECODER_PREFIXES = ("decoder_", "mask_token")


def tool_parser(doc, many_checkpoints, num_images=None, no_plot=False):
    """--checkpoint (or --checkpoints and --labels), --checkpoint_key and --model; with num_images, also the images,
    device and output arguments every analysis tool shares."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    weights = "'model' (student) or 'model_ema' (teacher)"
    if many_checkpoints:
        parser.add_argument("--checkpoints", nargs="+", required=True, metavar="PATH",
                            help="pre-training checkpoints (ours, the LUT authors' or MAE's), drawn on one plot")
        parser.add_argument("--labels", nargs="+", help="legend / JSON name of each checkpoint (default: folder/file)")
        parser.add_argument("--checkpoint_key", nargs="+", default=["model"], choices=["model", "model_ema"],
                            help=weights + ": one for all or one per checkpoint")
    else:
        parser.add_argument("--checkpoint", required=True, metavar="PATH",
                            help="pre-training checkpoint (ours, the LUT authors' or MAE's)")
        parser.add_argument("--checkpoint_key", default="model", choices=["model", "model_ema"], help=weights)
    parser.add_argument("--model", default=None, choices=sorted(models_lut.MODELS),
                        help="architecture, when the checkpoint's args name no known one (sizes come from the weights)")
    if num_images is None:
        return parser
    parser.add_argument("--data_path", required=True,
                        help="images: a folder (its train/ split if it has one) in any layout of docs/data.md")
    parser.add_argument("--num_images", type=int, default=num_images,
                        help=f"images to use, evenly spaced over the sorted file list (default {num_images})")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output_dir", default="./analysis", help="where the JSON / PNG files go")
    parser.add_argument("--log_dir", default=None, help="also log the figures to TensorBoard here")
    if no_plot:
        parser.add_argument("--no_plot", action="store_true", help="write the JSON only (no matplotlib needed)")
    return parser


def image_paths(args, needs_matplotlib=False):
    """Check the shared arguments before loading anything, then pick --num_images images evenly spaced over the
    samples of --data_path (so every class is represented): a Picked list."""
    many = hasattr(args, "checkpoints")
    for path in args.checkpoints if many else [args.checkpoint]:
        if not os.path.isfile(path):
            raise SystemExit(f"checkpoint not found: {path}")
    if many and args.labels and len(args.labels) != len(args.checkpoints):
        raise SystemExit(f"give one --labels entry per checkpoint ({len(args.checkpoints)}), got {len(args.labels)}")
    if many and len(args.checkpoint_key) not in (1, len(args.checkpoints)):
        raise SystemExit(f"give one --checkpoint_key for all checkpoints or one per checkpoint "
                         f"({len(args.checkpoints)}), got {len(args.checkpoint_key)}")
    if args.num_images < 1 or args.batch_size < 1:
        raise SystemExit("--num_images and --batch_size must be positive")
    if needs_matplotlib:
        try:
            importlib.import_module("matplotlib.figure")
        except ImportError:
            raise SystemExit("plots need matplotlib, an optional dependency: pip install matplotlib "
                             "(it is in requirements-dev.txt), or pass --no_plot to write the JSON only") from None
    try:
        images = open_images(args.data_path, labelled=False)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--data_path: {e}") from None
    picks = np.unique(np.linspace(0, len(images) - 1, num=min(args.num_images, len(images))).round().astype(int))
    return Picked(images, picks)


class Picked:
    """Some samples of util.sources.Images: load(k) decodes the k-th, name(k) names it."""

    def __init__(self, images, picks):
        self.images, self.picks = images, picks

    def __len__(self):
        return len(self.picks)

    def load(self, k):
        return read_image(self.images, self.picks[k])

    def name(self, k):
        return self.images.name(self.picks[k])


def checkpoint_models(args):
    """Yield (label, path, checkpoint_key, model on args.device, info) for each of --checkpoints, one at a time."""
    keys = args.checkpoint_key * len(args.checkpoints) if len(args.checkpoint_key) == 1 else args.checkpoint_key

    def default_label(path, key):  # folder/file, e.g. lut_vit_b/checkpoint-399
        name = os.path.join(os.path.basename(os.path.dirname(os.path.abspath(path))),
                            os.path.splitext(os.path.basename(path))[0])
        return name + (" (teacher)" if key == "model_ema" else "")

    labels = args.labels or [default_label(p, key) for p, key in zip(args.checkpoints, keys)]
    if len(set(labels)) != len(labels):
        raise ValueError(f"checkpoint labels {labels} are not unique; name them with --labels")
    for label, path, key in zip(labels, args.checkpoints, keys):
        model, info = load_model(path, key, args.model)
        print(f"{label}: {info['name']} from {path} [{key}]")
        yield label, path, key, model.to(args.device), info


def load_model(path, checkpoint_key="model", model_name=None):
    """(eval-mode CPU model, dict(name, norm_pix_loss or None, has_decoder)) of the student ('model') or teacher
    ('model_ema') of our, the LUT authors' or MAE's checkpoints, without projector / predictor. The weights fix every
    size but the heads: those of `model_name` or the checkpoint's, else (MAE's files name none, the authors'
    `*_dec512d8b` aliases) the 64-d encoder and 32-d decoder heads of all published MAE / LUT models."""
    if not os.path.isfile(path):
        raise SystemExit(f"checkpoint not found: {path}")
    ckpt = load_checkpoint(path)
    if checkpoint_key in ckpt and ckpt[checkpoint_key] is None:
        raise ValueError(f"{path} has no {checkpoint_key!r} weights (MAE checkpoints have no teacher)")
    train_args = saved_args(ckpt)
    state = {k: v for k, v in normalize_pretrained(ckpt, checkpoint_key).items() if not k.startswith(HEAD_PREFIXES)}
    if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
        raise ValueError(f"{path} has no patch_embed.proj.weight / pos_embed: not a ViT pre-training checkpoint")
    embed_dim, in_chans, patch_size, _ = state["patch_embed.proj.weight"].shape
    grid = round((state["pos_embed"].shape[1] - 1) ** 0.5)
    arch = dict(img_size=grid * patch_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                depth=len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
                mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim)
    has_decoder = "decoder_embed.weight" in state
    if has_decoder:
        arch.update(decoder_embed_dim=state["decoder_embed.weight"].shape[0],
                    decoder_depth=len({k.split(".")[1] for k in state if k.startswith("decoder_blocks.")}))
    name = model_name or train_args.get("model")
    if name in models_lut.MODELS:
        model = models_lut.MODELS[name](**arch)
    else:
        model = models_lut.MaskedAutoencoderViT(**arch, num_heads=embed_dim // 64,
                                                decoder_num_heads=arch.get("decoder_embed_dim", 512) // 32)
        name = f"MaskedAutoencoderViT ({model.blocks[0].attn.num_heads} heads, inferred)"
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(HEAD_PREFIXES)
               and (has_decoder or not k.startswith(DECODER_PREFIXES))]
    if missing or unexpected:
        raise ValueError(f"{path} [{checkpoint_key}] does not fit {name}: missing {missing}, unexpected {unexpected}")
    return model.eval(), dict(name=name, norm_pix_loss=train_args.get("norm_pix_loss"), has_decoder=has_decoder)


def image_batches(paths, model, args):
    """Evaluation views (resize, centre crop, ImageNet mean / std) of `paths`, [b, 3, S, S] batches on args.device."""
    transform = eval_transform(model.patch_embed.img_size[0])
    for i in range(0, len(paths), args.batch_size):
        yield normalize(torch.stack([transform(paths.load(k)) for k in range(i, min(i + args.batch_size, len(paths)))
                                     ]).to(args.device))


def denormalize(imgs):
    """ImageNet-normalised [..., 3, H, W] -> RGB in [0, 1]."""
    mean = imgs.new_tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = imgs.new_tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    return (imgs * std + mean).clamp(0, 1)


def enlarge(imgs, min_size=128):
    """Nearest-neighbour upscaling by an integer factor so small inputs (e.g. 32 px) are visible in a figure."""
    factor = max(1, -(-min_size // imgs.shape[-1]))
    return imgs.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


@torch.no_grad()
def block_inputs(model, imgs):
    """Encoder on all patches of imgs [B, 3, H, W]; returns the input of every block, `depth` tensors [B, 1 + L, D]."""
    inputs = []
    hooks = [blk.register_forward_pre_hook(lambda module, args: inputs.append(args[0])) for blk in model.blocks]
    try:
        model.forward_encoder(imgs)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


@torch.no_grad()
def attention_weights(block, x):
    """Self-attention weights of a timm Block for its input x: [B, N, D] -> [B, heads, N, N], rows (queries) sum to 1,
    recomputed from the qkv projection of norm1(x) because timm's fused attention never materialises them."""
    attn = block.attn
    B, N, _ = x.shape
    q, k, _ = attn.qkv(block.norm1(x)).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def mean_attention_distance(attn, grid_size, patch_size, renormalize=True):
    """attn [B, heads, 1 + L, 1 + L] -> [B, heads] pixels, CLS left out as query and key (docs/tools.md). Without
    `renormalize`, attention to CLS counts as distance 0, as in the notebooks after Raghu et al. (2021)."""
    a = attn[:, :, 1:, 1:].double()
    if renormalize:
        a = a / a.sum(dim=-1, keepdim=True)
    centres = torch.cartesian_prod(*(torch.arange(n) for n in grid_size)).double() * patch_size  # [L, 2] row-major
    distances = (centres[:, None, :] - centres[None, :, :]).norm(dim=-1).to(a.device)  # [L, L] pixels
    return (a * distances).sum(dim=-1).mean(dim=-1)


class FeatureSpectrum:
    """Singular values of a stack of feature rows [n, D], accumulated batch by batch in a D x D Gram matrix X^T X
    (float64), so any number of token features fits: those of X are the square roots of its eigenvalues, those of the
    centred X (rows minus their mean m) of X^T X - n m m^T."""

    def __init__(self, dim):
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.gram = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, features):
        x = features.detach().to("cpu", torch.float64)
        self.count += x.shape[0]
        self.sum += x.sum(dim=0)
        self.gram += x.T @ x

    def singular_values(self, center=True):
        """Descending, min(n, D) of them."""
        gram = self.gram
        if center:
            mean = self.sum / self.count
            gram = gram - self.count * torch.outer(mean, mean)
        eig = torch.linalg.eigvalsh(gram).flip(0).clamp(min=0)
        return eig[:min(self.count, len(eig))].sqrt()


def effective_rank(singular_values):
    """exp(entropy of the singular values normalised to sum 1) (Roy & Vetterli, 2007); k equal values give k."""
    p = singular_values / singular_values.sum()
    return float(torch.exp(-torch.special.xlogy(p, p).sum()))


def predicted_pixels(model, imgs, pred, norm_pix_loss):
    """Decoder output pred [B, L, p*p*3] as patches in the (ImageNet-normalised) space of imgs [B, 3, H, W]; a norm-pix
    prediction gets the mean and std of the original patch back, as in the usual MAE visualisations."""
    if not norm_pix_loss:
        return pred
    target = model.patchify(imgs)
    var = target.var(dim=-1, keepdim=True)  # unbiased, as in forward_loss
    return pred * (var + 1.0e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)


def reconstruction_rows(model, imgs, pred, mask, norm_pix_loss):
    """Per image: original, masked input, reconstruction, reconstruction with the visible patches pasted in.
    imgs: [B, 3, H, W] normalised; pred: [B, L, p*p*3]; mask: [B, L], 1 = removed -> RGB [4 * B, 3, H, W] in [0, 1]."""
    recon = model.unpatchify(predicted_pixels(model, imgs, pred, norm_pix_loss))
    pixel_mask = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1]).to(imgs.dtype))
    # Removed patches are shown as 0 in normalised space, i.e. the ImageNet mean colour (grey), as MAE's demo does.
    masked = imgs * (1 - pixel_mask)
    rows = torch.stack([imgs, masked, recon, masked + recon * pixel_mask], dim=1)
    return denormalize(rows.flatten(0, 1))


def summary_writer(log_dir):
    """TensorBoard SummaryWriter for a `with` block; without a log_dir the block gets None."""
    if not log_dir:
        return contextlib.nullcontext()
    from torch.utils.tensorboard import SummaryWriter  # imported on use: it takes a second
    return SummaryWriter(log_dir)


def save_images(images, path, nrow, writer, tag):
    """Write images [N, 3, H, W] in [0, 1] as one grid PNG, `nrow` images per row."""
    grid = torchvision.utils.make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
    torchvision.utils.save_image(grid, path)
    if writer is not None:
        writer.add_image(tag, grid)
    print(f"wrote {path}")


def analyse_checkpoints(args, name, measure, plot):
    """For each checkpoint of --checkpoints, the fields measure(model, image paths, args) returns; written to
    OUTPUT_DIR/<name>.json as {label: {checkpoint, checkpoint_key, model, num_images, **fields}} and, unless
    --no_plot, drawn by plot(results) -> matplotlib figure, OUTPUT_DIR/<name>.png."""
    paths = image_paths(args, needs_matplotlib=not args.no_plot)
    os.makedirs(args.output_dir, exist_ok=True)
    results = {label: dict(checkpoint=path, checkpoint_key=key, model=info["name"], num_images=len(paths),
                           **measure(model, paths, args)) for label, path, key, model, info in checkpoint_models(args)}
    json_path = os.path.join(args.output_dir, f"{name}.json")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {json_path}")
    if not args.no_plot:
        fig, png_path = plot(results), os.path.join(args.output_dir, f"{name}.png")
        fig.savefig(png_path, dpi=150, bbox_inches="tight")
        with summary_writer(args.log_dir) as writer:
            if writer is not None:
                writer.add_figure(name, fig)
        print(f"wrote {png_path}")
