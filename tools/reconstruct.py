"""Reconstructions of masked images by a pre-trained model, as an image grid.

    python tools/reconstruct.py --checkpoint lut.pth --data_path /datasets/imagenet/val --num_images 8 \
        --mask_ratio 0.75 --output_dir analysis

One row per image: original, masked input (removed patches grey), reconstruction, reconstruction with the visible
patches pasted in. Writes OUTPUT_DIR/reconstructions_mask<ratio in %>.png; details: docs/tools.md.
"""
import argparse
import os

import torch

# analysis first: it puts the repository root on sys.path.
from analysis import (enlarge, image_batches, image_paths, load_model, reconstruction_rows, save_images,
                      summary_writer, tool_parser)
from models_lut import MaskedAutoencoderViT, check_mask_ratio


def get_args_parser():
    parser = tool_parser(__doc__, many_checkpoints=False, num_images=8)
    parser.add_argument("--mask_ratio", type=float, default=0.75, help="share of patches removed (default 0.75)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the masking noise")
    parser.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction, default=None,
                        help="whether the model predicts normalised patches (default: from the checkpoint's args)")
    return parser


@torch.no_grad()
def main(args):
    try:
        check_mask_ratio(args.mask_ratio)
        paths = image_paths(args)
        model, info = load_model(args.checkpoint, args.checkpoint_key, args.model)
        check_mask_ratio(args.mask_ratio, model.num_patches)  # at least one visible patch of this model's
    except ValueError as e:
        raise SystemExit(f"--{e}") from None
    if not info["has_decoder"]:
        raise ValueError(f"{args.checkpoint} has no decoder weights (e.g. MAE's encoder-only release); reconstructions "
                         "need a full pre-training checkpoint such as MAE's mae_visualize_vit_large.pth")
    norm_pix_loss = info["norm_pix_loss"] if args.norm_pix_loss is None else args.norm_pix_loss
    if norm_pix_loss is None:
        raise ValueError(f"{args.checkpoint} does not record norm_pix_loss: pass --norm_pix_loss or --no-norm_pix_loss")
    print(f"{info['name']} from {args.checkpoint} [{args.checkpoint_key}], norm_pix_loss={norm_pix_loss}, "
          f"mask ratio {args.mask_ratio}, {len(paths)} images")
    model.to(args.device)
    noise = torch.rand(len(paths), model.num_patches, generator=torch.Generator().manual_seed(args.seed))
    rows = []
    for imgs, batch_noise in zip(image_batches(paths, model, args), noise.split(args.batch_size)):
        # MAE's forward: for LUT, the path of view 1 in its training step.
        _, pred, mask = MaskedAutoencoderViT.forward(model, imgs, args.mask_ratio, batch_noise.to(args.device))
        rows.append(reconstruction_rows(model, imgs, pred, mask, norm_pix_loss).cpu())
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, f"reconstructions_mask{round(args.mask_ratio * 100)}.png")
    with summary_writer(args.log_dir) as writer:
        save_images(enlarge(torch.cat(rows)), path, nrow=4, writer=writer, tag="reconstructions")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
