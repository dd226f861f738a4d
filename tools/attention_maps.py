"""Attention maps of chosen query patches over an image (as in the LUT paper's figure 1), one PNG per image.

    python tools/attention_maps.py --checkpoints mae.pth lut.pth --labels MAE LUT \
        --data_path /datasets/imagenet/val --num_images 4 --queries 0.5,0.5 0.3,0.7 --output_dir analysis

A query "y,x" is a position as fractions of the image height and width (0.5,0.5: the patch under the centre). Each
PNG has one row per checkpoint and query: the image with the query patch framed, then that patch's attention in
--layer (CLS left out) averaged over the heads, then per head. Writes OUTPUT_DIR/attention_maps_<k>_<image name>.png.
"""
import argparse
import os

import torch

from analysis import (attention_weights, block_inputs, checkpoint_models, denormalize, enlarge, image_batches,
                      image_paths, save_images, summary_writer, tool_parser)


def parse_query(text):
    try:
        y, x = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"query {text!r} is not 'y,x'") from None
    if not (0 <= y <= 1 and 0 <= x <= 1):
        raise argparse.ArgumentTypeError(f"query {text!r}: y and x are fractions of the image, in [0, 1]")
    return y, x


def get_args_parser():
    parser = tool_parser(__doc__, many_checkpoints=True, num_images=4)
    parser.add_argument("--queries", nargs="+", type=parse_query, default=[(0.5, 0.5)], metavar="Y,X",
                        help="query positions as fractions of height and width (default 0.5,0.5)")
    parser.add_argument("--layer", type=int, default=-1,
                        help="encoder block, counted from 0; negative counts from the end (default -1, the last)")
    return parser


def framed(img, row, col, patch):
    """RGB img [3, H, W] with a cyan frame (visible on the map colours and most photos) around patch (row, col)."""
    img, width = img.clone(), max(1, patch // 8)
    box = img[:, row * patch:(row + 1) * patch, col * patch:(col + 1) * patch]
    inside = box[:, width:-width, width:-width].clone()
    box[:] = img.new_tensor((0.0, 1.0, 1.0)).view(3, 1, 1)
    box[:, width:-width, width:-width] = inside
    return img


@torch.no_grad()
def attention_tiles(model, imgs, queries, layer):
    """imgs [B, 3, S, S] -> per image, per query, [framed image, head mean, head 1, ..., head H], RGB [3, S, S]."""
    grid, patch = model.patch_embed.grid_size, model.patch_embed.patch_size[0]
    attn = attention_weights(model.blocks[layer], block_inputs(model, imgs)[layer])
    attn = attn[:, :, 1:, 1:].cpu()  # [B, H, L, L], CLS left out as query and key
    rgb = denormalize(imgs.cpu())
    tiles = []
    for b in range(imgs.shape[0]):
        rows = []
        for query in queries:
            r, c = (min(int(q * n), n - 1) for q, n in zip(query, grid))  # the patch under the query
            maps = attn[b, :, r * grid[1] + c].reshape(-1, 1, *grid)  # [H, 1, h, w]
            maps = torch.cat([maps.mean(dim=0, keepdim=True), maps])
            # Each map scaled to its maximum, coloured black-red-yellow-white like matplotlib's 'hot', over the image.
            t = torch.nn.functional.interpolate(maps / maps.amax(dim=(2, 3), keepdim=True), size=rgb.shape[-2:])
            heat = torch.cat([(3 * t).clamp(0, 1), (3 * t - 1).clamp(0, 1), (3 * t - 2).clamp(0, 1)], dim=1)
            rows.append([framed(rgb[b], r, c, patch), *(0.35 * rgb[b] + 0.65 * heat)])
        tiles.append(rows)
    return tiles


def main(args):
    paths = image_paths(args)
    per_run, labels = [], []
    for label, _, _, model, _ in checkpoint_models(args):
        if not -len(model.blocks) <= args.layer < len(model.blocks):
            raise ValueError(f"--layer {args.layer} is out of range for {label}'s {len(model.blocks)} blocks")
        labels.append(label)
        per_run.append([tiles for imgs in image_batches(paths, model, args)
                        for tiles in attention_tiles(model, imgs, args.queries, args.layer)])
    sizes = {tiles[0][0][0].shape for tiles in per_run}
    if len(sizes) > 1:
        raise ValueError(f"the checkpoints take different input sizes {sorted(s[-1] for s in sizes)}; draw their "
                         "attention maps in separate runs")
    columns = max(len(row) for tiles in per_run for row in tiles[0])
    print("rows of each PNG: " + ", ".join(f"{label} @ {y:g},{x:g}" for label in labels for y, x in args.queries))
    os.makedirs(args.output_dir, exist_ok=True)
    with summary_writer(args.log_dir) as writer:
        for k in range(len(paths)):
            rows = [row for tiles in per_run for row in tiles[k]]
            blank = torch.ones_like(rows[0][0])  # pads the rows of models with fewer heads
            grid = torch.stack([t for row in rows for t in row + [blank] * (columns - len(row))])
            name = os.path.splitext(os.path.basename(paths.name(k)))[0]
            save_images(enlarge(grid), os.path.join(args.output_dir, f"attention_maps_{k:02d}_{name}.png"),
                        nrow=columns, writer=writer, tag=f"attention_maps/{k:02d}_{name}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
