"""Singular-value spectrum and effective rank of encoder features (several checkpoints on one plot).

    python tools/spectrum.py --checkpoints mae.pth lut.pth --labels MAE LUT \
        --data_path /datasets/imagenet/val --num_images 1000 --output_dir analysis

Features: final-norm encoder outputs, all patches visible; `pooled` = each image's mean patch token, `tokens` = all
patch tokens. Writes OUTPUT_DIR/spectrum.json ({label: {pooled: {singular_values, effective_rank}, tokens: ...}}) and
OUTPUT_DIR/spectrum.png (log-scale spectra of the centred features). Definitions: docs/tools.md.
"""
import torch

from analysis import FeatureSpectrum, analyse_checkpoints, effective_rank, image_batches, tool_parser

FEATURES = {"pooled": "mean of patch tokens, per image", "tokens": "patch tokens"}


def get_args_parser():
    return tool_parser(__doc__, many_checkpoints=True, num_images=1000, no_plot=True)


@torch.no_grad()
def encoder_spectra(model, paths, args):
    spectra = {name: FeatureSpectrum(model.pos_embed.shape[-1]) for name in FEATURES}
    for imgs in image_batches(paths, model, args):
        patches = model.forward_encoder(imgs)[:, 1:, :]
        spectra["pooled"].update(patches.mean(dim=1))
        spectra["tokens"].update(patches.flatten(0, 1))
    results = {}
    for name, spectrum in spectra.items():
        s = spectrum.singular_values()
        results[name] = dict(effective_rank=effective_rank(s), singular_values=s.tolist())
        print(f"  {name}: effective rank {results[name]['effective_rank']:.2f} of {len(s)}")
    return results


def plot(results):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 4))
    for ax, (name, title) in zip(fig.subplots(1, len(FEATURES)), FEATURES.items()):
        for i, (label, result) in enumerate(results.items()):
            s = [v for v in result[name]["singular_values"] if v > 0]
            ax.plot(range(1, len(s) + 1), s, color=f"C{i}",
                    label=f"{label} (effective rank {result[name]['effective_rank']:.1f})")
        ax.set(yscale="log", title=title, xlabel="singular value index", ylabel="singular value")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def main(args):
    analyse_checkpoints(args, "spectrum", encoder_spectra, plot)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
