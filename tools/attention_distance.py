"""Mean attention distance per layer and head of pre-trained encoders (MAE vs LUT on one plot).

    python tools/attention_distance.py --checkpoints mae.pth lut.pth --labels MAE LUT \
        --data_path /datasets/imagenet/val --num_images 1000 --output_dir analysis

Every image is encoded with all patches visible. For each layer and head: for each query patch, the
attention-weighted distance in pixels between its centre and the centre of every key patch (CLS excluded as query and
key, the remaining weights renormalised to sum to 1), averaged over the query patches and the images.
Writes OUTPUT_DIR/attention_distance.json ({label: {per_layer: [depth], per_head: [depth][heads], ...}}) and
OUTPUT_DIR/attention_distance.png (one dot per head, a line through the head means, one colour per checkpoint).
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

# Run as a script from anywhere: the project root holds models_lut and util.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from analysis import (add_common_args, attention_weights, block_inputs, check_common_args, checkpoint_runs,
                      image_batches, load_model, mean_attention_distance, pick_images, require_matplotlib,
                      save_figure, summary_writer)


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, many_checkpoints=True, num_images=256)
    parser.add_argument("--no_renormalize", action="store_true",
                        help="keep the raw weights after dropping CLS (the convention of the common notebooks after "
                             "Raghu et al. 2021, which counts attention to CLS as distance 0)")
    parser.add_argument("--no_plot", action="store_true", help="write the JSON only (no matplotlib needed)")
    return parser


@torch.no_grad()
def attention_distances(model, paths, batch_size, device, renormalize=True):
    """Mean attention distance in pixels, [depth, heads], averaged over the images `paths`."""
    grid, patch = model.patch_embed.grid_size, model.patch_embed.patch_size[0]
    total, count = 0.0, 0
    for imgs in image_batches(paths, model.patch_embed.img_size[0], batch_size):
        inputs = block_inputs(model, imgs.to(device))
        total = total + torch.stack([
            mean_attention_distance(attention_weights(blk, x), grid, patch, renormalize).sum(dim=0)
            for blk, x in zip(model.blocks, inputs)]).cpu()
        count += imgs.shape[0]
    return total / count


def plot(results, path, writer=None):
    Figure = require_matplotlib()
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for i, (label, result) in enumerate(results.items()):
        per_head = np.array(result["per_head"])
        layers = np.arange(1, per_head.shape[0] + 1)
        ax.scatter(np.repeat(layers, per_head.shape[1]), per_head.flatten(), s=10, color=f"C{i}", alpha=0.4)
        ax.plot(layers, per_head.mean(axis=1), color=f"C{i}", marker="o", label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_xticks(layers)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path, writer, "attention_distance")


def main(args):
    check_common_args(args, needs_matplotlib=not args.no_plot)
    paths = pick_images(args.data_path, args.num_images)
    runs = checkpoint_runs(args)
    os.makedirs(args.output_dir, exist_ok=True)
    results = {}
    for label, path, key in runs:
        model, info = load_model(path, key, args.model)
        print(f"{label}: {info['name']} from {path} [{key}], {len(paths)} images")
        distances = attention_distances(model.to(args.device), paths, args.batch_size, args.device,
                                        renormalize=not args.no_renormalize)
        results[label] = dict(checkpoint=path, checkpoint_key=key, model=info["name"],
                              input_size=model.patch_embed.img_size[0], patch_size=model.patch_embed.patch_size[0],
                              num_images=len(paths), renormalized=not args.no_renormalize,
                              per_layer=distances.mean(dim=1).tolist(), per_head=distances.tolist())
        print("  per layer (pixels): " + " ".join(f"{d:.1f}" for d in results[label]["per_layer"]))
    json_path = os.path.join(args.output_dir, "attention_distance.json")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {json_path}")
    if not args.no_plot:
        with summary_writer(args.log_dir) as writer:
            plot(results, os.path.join(args.output_dir, "attention_distance.png"), writer)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
