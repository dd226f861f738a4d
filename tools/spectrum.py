"""Singular-value spectrum and effective rank of encoder features (several checkpoints on one plot).

    python tools/spectrum.py --checkpoints mae.pth lut.pth --labels MAE LUT \
        --data_path /datasets/imagenet/val --num_images 1000 --output_dir analysis

Every image is encoded with all patches visible; the features are the encoder outputs after its final norm:
`pooled` = the mean of the patch tokens of each image (the vector LUT's projector reads, CLS excluded), `tokens` =
every patch token of every image. The spectrum is that of the centred feature matrix (each row minus the mean row,
so the squared singular values are the row count times the covariance eigenvalues), in descending order; the
effective rank is exp(entropy of the singular values normalised to sum 1) (Roy & Vetterli, 2007), between 1 and the
feature width.
Writes OUTPUT_DIR/spectrum.json ({label: {pooled: {singular_values, effective_rank}, tokens: {...}, ...}}) and
OUTPUT_DIR/spectrum.png (log-scale spectra, one colour per checkpoint).
"""
import argparse
import json
import os
import sys

import torch

# Run as a script from anywhere: the project root holds models_lut and util.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from analysis import (FeatureSpectrum, add_common_args, check_common_args, checkpoint_runs, effective_rank,
                      image_batches, load_model, pick_images, require_matplotlib, save_figure,
                      summary_writer)

FEATURES = {"pooled": "mean of patch tokens, per image", "tokens": "patch tokens"}


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, many_checkpoints=True, num_images=1000)
    parser.add_argument("--no_plot", action="store_true", help="write the JSON only (no matplotlib needed)")
    return parser


@torch.no_grad()
def encoder_spectra(model, paths, batch_size, device):
    """{'pooled': singular values, 'tokens': singular values} of the encoder features of the images `paths`."""
    spectra = {name: FeatureSpectrum(model.pos_embed.shape[-1]) for name in FEATURES}
    for imgs in image_batches(paths, model.patch_embed.img_size[0], batch_size):
        patches = model.forward_encoder(imgs.to(device))[:, 1:, :]
        spectra["pooled"].update(patches.mean(dim=1))
        spectra["tokens"].update(patches.flatten(0, 1))
    return {name: s.singular_values() for name, s in spectra.items()}


def plot(results, path, writer=None):
    Figure = require_matplotlib()
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, len(FEATURES))
    for ax, (name, title) in zip(axes, FEATURES.items()):
        for i, (label, result) in enumerate(results.items()):
            s = [v for v in result[name]["singular_values"] if v > 0]
            ax.plot(range(1, len(s) + 1), s, color=f"C{i}",
                    label=f"{label} (effective rank {result[name]['effective_rank']:.1f})")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("singular value index")
        ax.set_ylabel("singular value")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    save_figure(fig, path, writer, "spectrum")


def main(args):
    check_common_args(args, needs_matplotlib=not args.no_plot)
    paths = pick_images(args.data_path, args.num_images)
    runs = checkpoint_runs(args)
    os.makedirs(args.output_dir, exist_ok=True)
    results = {}
    for label, path, key in runs:
        model, info = load_model(path, key, args.model)
        print(f"{label}: {info['name']} from {path} [{key}], {len(paths)} images")
        spectra = encoder_spectra(model.to(args.device), paths, args.batch_size, args.device)
        results[label] = dict(checkpoint=path, checkpoint_key=key, model=info["name"], num_images=len(paths))
        for name, s in spectra.items():
            results[label][name] = dict(effective_rank=effective_rank(s), singular_values=s.tolist())
            print(f"  {name}: effective rank {results[label][name]['effective_rank']:.2f} of {len(s)}")
    json_path = os.path.join(args.output_dir, "spectrum.json")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {json_path}")
    if not args.no_plot:
        with summary_writer(args.log_dir) as writer:
            plot(results, os.path.join(args.output_dir, "spectrum.png"), writer)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
