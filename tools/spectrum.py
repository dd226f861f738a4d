"""Singular-value spectrum and effective rank of encoder features (several checkpoints on one plot).

    python tools/spectrum.py --checkpoints mae.pth lut.pth --labels MAE LUT \
        --data_path /datasets/imagenet/val --num_images 1000 --output_dir analysis

Features: the encoder outputs after its final norm, all patches visible; `pooled` = the mean patch token of each
image (what LUT's projector reads), `tokens` = every patch token. The spectrum is that of the centred feature matrix;
the effective rank is analysis.effective_rank (Roy & Vetterli, 2007), between 1 and the feature width.
Writes OUTPUT_DIR/spectrum.json ({label: {pooled: {singular_values, effective_rank}, tokens: {...}, ...}}) and
OUTPUT_DIR/spectrum.png (log-scale spectra, one colour per checkpoint).
"""
import argparse

import torch

from analysis import (FeatureSpectrum, add_common_args, analyse_checkpoints, effective_rank, image_batches,
                      require_matplotlib, save_figure)

FEATURES = {"pooled": "mean of patch tokens, per image", "tokens": "patch tokens"}


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, many_checkpoints=True, num_images=1000)
    parser.add_argument("--no_plot", action="store_true", help="write the JSON only (no matplotlib needed)")
    return parser


@torch.no_grad()
def encoder_spectra(model, paths, args):
    """The JSON fields of one model: {effective_rank, singular_values} of its 'pooled' and its 'tokens' features."""
    spectra = {name: FeatureSpectrum(model.pos_embed.shape[-1]) for name in FEATURES}
    for imgs in image_batches(paths, model.patch_embed.img_size[0], args.batch_size):
        patches = model.forward_encoder(imgs.to(args.device))[:, 1:, :]
        spectra["pooled"].update(patches.mean(dim=1))
        spectra["tokens"].update(patches.flatten(0, 1))
    results = {}
    for name, spectrum in spectra.items():
        s = spectrum.singular_values()
        results[name] = dict(effective_rank=effective_rank(s), singular_values=s.tolist())
        print(f"  {name}: effective rank {results[name]['effective_rank']:.2f} of {len(s)}")
    return results


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
    analyse_checkpoints(args, "spectrum", encoder_spectra, plot)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
