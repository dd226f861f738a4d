"""Weighted k-NN accuracy of a pre-trained encoder (DINO's protocol: k = 20, temperature 0.07), no training.

data_path/train/<class>/ is the labelled memory bank, data_path/val/<class>/ is classified. Features are the CLS
token after the encoder's final norm (--lut_global: the mean of the final-norm patch tokens), L2-normalised. Without
--finetune the encoder keeps its random initialisation (a baseline). TRAINING.md has the commands."""
import argparse
import json
import os

import models_vit
from engine_finetune import add_encoder_args, check_encoder_args
from util.checkpoint import write_atomically
from util.dist import destroy_distributed, is_main_process
from util.knn import KNNEvaluator
from util.rng import seed_everything
from util.run import add_run_args, start_run
from util.sources import add_source_args


def get_args_parser():
    parser = argparse.ArgumentParser("k-NN evaluation of a pre-trained ViT", add_help=False)
    add_encoder_args(parser)
    parser.add_argument("--lut_global", action="store_true",
                        help="mean of the final-norm patch tokens instead of the CLS token")
    parser.add_argument("--nb_knn", default=20, type=int, help="neighbours k")
    parser.add_argument("--temperature", default=0.07, type=float, help="neighbour weight exp(cos / temperature)")
    add_source_args(parser, labelled=True)
    parser.add_argument("--batch_size", default=256, type=int, help="images per GPU for feature extraction")
    add_run_args(parser, training=False)
    parser.set_defaults(output_dir="")  # knn.json only where asked for
    return parser


def main(args):
    """Returns dict(knn_top1, knn_top5) in %."""
    device = start_run(args)
    check_encoder_args(args)
    try:
        knn = KNNEvaluator(args.data_path, args.input_size, args.batch_size, args.num_workers, args.nb_knn,
                           args.temperature, "avg" if args.lut_global else "token",
                           columns=dict(image_column=args.image_column, label_column=args.label_column))
    except ValueError as e:
        raise SystemExit(f"--data_path: {e}")
    seed_everything(args.seed)  # every rank builds the same random baseline
    model = models_vit.MODELS[args.model](img_size=args.input_size, patch_size=args.patch_size, num_classes=0,
                                          global_pool="avg" if args.lut_global else "token", fc_norm=False)
    if args.finetune:
        models_vit.load_pretrained(model, args.finetune, args.checkpoint_key)
    else:
        print("No --finetune checkpoint: k-NN on a randomly initialised encoder (a baseline)")
    stats = knn(model.to(device), device, args.amp)
    if args.output_dir and is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
        text = json.dumps({**stats, "finetune": args.finetune, "checkpoint_key": args.checkpoint_key, "k": args.nb_knn,
                           "temperature": args.temperature, "pool": "avg" if args.lut_global else "token",
                           "input_size": args.input_size, "patch_size": args.patch_size})
        write_atomically(os.path.join(args.output_dir, "knn.json"), lambda f: f.write(text.encode()))
    destroy_distributed()
    return stats


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[get_args_parser()])
    main(parser.parse_args())
