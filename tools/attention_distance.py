"""Mean attention distance per layer and head of pre-trained encoders (MAE vs LUT on one plot).

    python tools/attention_distance.py --checkpoints mae.pth lut.pth --labels MAE LUT \
        --data_path /datasets/imagenet/val --num_images 1000 --output_dir analysis

Writes OUTPUT_DIR/attention_distance.json ({label: {per_layer: [depth], per_head: [depth][heads], ...}}, pixels) and
OUTPUT_DIR/attention_distance.png (one dot per head, a line through the head means). Definition: docs/tools.md.
"""
import numpy as np
import torch

from analysis import (analyse_checkpoints, attention_weights, block_inputs, image_batches, mean_attention_distance,
                      tool_parser)


def get_args_parser():
    parser = tool_parser(__doc__, many_checkpoints=True, num_images=256, no_plot=True)
    parser.add_argument("--no_renormalize", action="store_true",
                        help="keep the raw weights after dropping CLS, which counts attention to CLS as distance 0 "
                             "(the notebooks after Raghu et al. 2021)")
    return parser


@torch.no_grad()
def attention_distances(model, paths, args):
    grid, patch = model.patch_embed.grid_size, model.patch_embed.patch_size[0]
    renormalize = not args.no_renormalize
    total = 0.0
    for imgs in image_batches(paths, model, args):
        per_block = [mean_attention_distance(attention_weights(blk, x), grid, patch, renormalize).sum(dim=0)
                     for blk, x in zip(model.blocks, block_inputs(model, imgs))]
        total = total + torch.stack(per_block).cpu()
    distances = total / len(paths)  # [depth, heads]
    per_layer = distances.mean(dim=1).tolist()
    print("  per layer (pixels): " + " ".join(f"{d:.1f}" for d in per_layer))
    return dict(input_size=model.patch_embed.img_size[0], patch_size=patch, renormalized=renormalize,
                per_layer=per_layer, per_head=distances.tolist())


def plot(results):
    from matplotlib.figure import Figure
    ax = Figure(figsize=(6, 4)).subplots()
    for i, (label, result) in enumerate(results.items()):
        per_head = np.array(result["per_head"])
        layers = np.arange(1, per_head.shape[0] + 1)
        ax.scatter(np.repeat(layers, per_head.shape[1]), per_head.flatten(), s=10, color=f"C{i}", alpha=0.4)
        ax.plot(layers, per_head.mean(axis=1), color=f"C{i}", marker="o", label=label)
    ax.set(xlabel="layer", ylabel="mean attention distance (pixels)", xticks=layers)
    ax.grid(alpha=0.3)
    ax.legend()
    return ax.figure


def main(args):
    analyse_checkpoints(args, "attention_distance", attention_distances, plot)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
