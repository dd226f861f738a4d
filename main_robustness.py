"""Robustness of a fine-tuned ImageNet classifier: ImageNet-V2, -Sketch, -R, -A and -C, each by its authors' rules.

--data_root holds any of imagenet-v2/, imagenet-sketch/, imagenet-r/, imagenet-a/, imagenet-c/ in their released
layouts (TRAINING.md, "Robustness", has the commands); --imagenet_v2_path etc. point at one elsewhere. The evaluation
view and precision are fine-tuning's. output_dir/robustness.json is written after every set (every corruption and
severity of ImageNet-C), so a run killed mid-way resumes with what is left."""
import argparse
import json
import os

import numpy as np
import torch

import models_vit
from engine_finetune import add_encoder_args, check_encoder_args, evaluate
from util.augment import eval_crop_pct, eval_transform
from util.checkpoint import load_checkpoint, saved_args, write_atomically
from util.datasets import LabelledImages, rank_shard
from util.dist import destroy_distributed, is_main_process
from util.robustness import (ALEXNET_ERROR, ALEXNET_ERROR_EXTRA, CORRUPTIONS, EXTRA_CORRUPTIONS, IMAGENET_A_WNIDS,
                             IMAGENET_R_WNIDS, IMAGENET_WNIDS, SEVERITIES)
from util.run import add_run_args, start_run
from util.sources import FolderImages, open_folder

# Each set's class folders (the released layout) and the logits that compete: None = all 1000.
SETS = {
    "imagenet-v2": ([str(i) for i in range(1000)], None),  # folders 0..999: indices into the sorted WordNet ids
    "imagenet-sketch": (IMAGENET_WNIDS, None),
    "imagenet-r": (IMAGENET_R_WNIDS, [IMAGENET_WNIDS.index(w) for w in IMAGENET_R_WNIDS]),
    "imagenet-a": (IMAGENET_A_WNIDS, [IMAGENET_WNIDS.index(w) for w in IMAGENET_A_WNIDS]),
    "imagenet-c": (IMAGENET_WNIDS, None),  # <corruption>/<severity>/<wnid>/
}


def get_args_parser():
    parser = argparse.ArgumentParser("Robustness evaluation of a fine-tuned ViT", add_help=False)
    add_encoder_args(parser, pretrained=False)
    parser.add_argument("--resume", required=True, metavar="PATH",
                        help="fine-tuned checkpoint (main_finetune.py's, a 1000-class ImageNet classifier)")
    parser.add_argument("--data_root", default=None, help="folder holding the sets under their names (see SETS)")
    for name in SETS:
        parser.add_argument(f"--{name.replace('-', '_')}_path", default=None, help=f"{name} elsewhere")
    parser.add_argument("--batch_size", default=256, type=int, help="images per GPU")
    parser.add_argument("--dist_eval", action="store_true",
                        help="each rank evaluates a shard of every set (exact: no image repeated or dropped)")
    add_run_args(parser, training=False)
    parser.set_defaults(eval=True, output_dir="./output_dir/robustness")  # eval: sizes from --resume
    return parser


def find_sets(args):
    """{set name: folder} of the sets given or found under --data_root, their class folders checked."""
    found = {}
    for name in SETS:
        given = getattr(args, f"{name.replace('-', '_')}_path")
        if given and not os.path.isdir(given):
            raise SystemExit(f"--{name.replace('-', '_')}_path {given} is not a folder")
        path = given or (args.data_root and os.path.join(args.data_root, name))
        if path and os.path.isdir(path):
            found[name] = path
    if not found:
        raise SystemExit(f"no robustness set found: give --data_root with any of {', '.join(SETS)}, or their --*_path")
    for name, path in found.items():
        if name == "imagenet-c":
            unknown = sorted(set(corruptions(path)) - set(CORRUPTIONS + EXTRA_CORRUPTIONS))
            if unknown:
                raise SystemExit(f"{name} at {path}: {unknown[0]!r} is none of its 19 corruptions")
        for folder in parts(name, path).values():
            check_classes(name, folder)
    return found


def corruptions(folder):
    """The corruption folders under imagenet-c/ (files and hidden entries are not)."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def parts(name, root):
    """{result key: class-folder root} of a set: itself, or for ImageNet-C every corruption and severity."""
    if name != "imagenet-c":
        return {name: root}
    return {f"{name}/{c}/{s}": os.path.join(root, c, str(s)) for c in corruptions(root) for s in SEVERITIES}


def check_classes(name, folder):
    """Stop with a one-line message unless `folder` has exactly the class folders of set `name`'s release."""
    expected = SETS[name][0]
    found = sorted(e.name for e in os.scandir(folder) if e.is_dir()) if os.path.isdir(folder) else []
    if set(found) != set(expected):
        missing, other = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        raise SystemExit(f"{name} at {folder}: {len(found)} class folders, not the release's {len(expected)} "
                         f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                         f"{other[:3]}{'...' if len(other) > 3 else ''})")


def dataset(name, folder, transform):
    """The images of `folder` with labels that index the set's competing classes."""
    try:
        images = open_folder(folder, labelled=True)  # listed once and cached (util.sources)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{name}: {e}") from None
    if not isinstance(images, FolderImages) or images.targets is None:
        raise SystemExit(f"{name} at {folder}: expected the release's class folders of images only (found archives, "
                         f"or images outside the class folders)")
    position = {c: i for i, c in enumerate(SETS[name][0])}
    images.targets = np.array([position[c] for c in images.classes])[images.targets]
    return LabelledImages(images, transform)


def summarize(results):
    """The ImageNet-C summary of per-severity results: each corruption's error averaged over severities, mCE
    (Hendrycks & Dietterich: mean over the 15 corruptions of error / AlexNet's error, in %), the plain mean corruption
    error, and the same for the extra corruptions apart."""
    errors = {c: sum(100 - results[f"imagenet-c/{c}/{s}"]["acc1"] for s in SEVERITIES) / len(SEVERITIES)
              for c in CORRUPTIONS + EXTRA_CORRUPTIONS
              if all(f"imagenet-c/{c}/{s}" in results for s in SEVERITIES)}
    summary = {"corruption_error": errors}
    for label, names, alexnet in (("", CORRUPTIONS, ALEXNET_ERROR), ("extra_", EXTRA_CORRUPTIONS, ALEXNET_ERROR_EXTRA)):
        if all(c in errors for c in names):
            summary[f"{label}mCE"] = sum(errors[c] / alexnet[c] for c in names) / len(names)  # errors in %
            summary[f"{label}mean_corruption_error"] = sum(errors[c] for c in names) / len(names)
    return summary


def main(args):
    """Evaluate every set found; returns the results dict (also in output_dir/robustness.json)."""
    device = start_run(args)
    check_encoder_args(args)
    sets = find_sets(args)
    trained = saved_args(load_checkpoint(args.resume, mmap=True))
    config = dict(checkpoint=args.resume, model=args.model, input_size=args.input_size, patch_size=args.patch_size,
                  transform=f"resize {int(args.input_size / eval_crop_pct(args.input_size))} bicubic, centre crop "
                            f"{args.input_size}", amp=args.amp)
    path = os.path.join(args.output_dir, "robustness.json")
    results = {}
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        if saved["config"] != config:
            raise SystemExit(f"{path} holds results of another evaluation ({saved['config']}): use another "
                             f"--output_dir")
        results = saved["results"]
        print(f"{path}: {len(results)} results already there, not recomputed")

    model = models_vit.MODELS[args.model](img_size=args.input_size, patch_size=args.patch_size, num_classes=1000,
                                          global_pool="avg" if trained.get("global_pool", True) else "token")
    models_vit.load_classifier(model, args.resume)
    model.to(device)
    transform = eval_transform(args.input_size)
    reduce = args.dist_eval and args.distributed

    def save():
        if is_main_process():
            os.makedirs(args.output_dir, exist_ok=True)
            text = json.dumps(dict(config=config, results=results, **summarize(results)), indent=1)
            write_atomically(path, lambda f: f.write(text.encode()))

    for name, root in sets.items():
        classes = SETS[name][1]
        for key, folder in parts(name, root).items():
            if key in results:
                continue
            images = dataset(name, folder, transform)
            if reduce:
                images = rank_shard(images, args.rank, args.world_size)
            loader = torch.utils.data.DataLoader(images, batch_size=args.batch_size, num_workers=args.num_workers,
                                                 pin_memory=args.pin_mem and device.type == "cuda")
            stats = evaluate(model, loader, device, args.amp, reduce,
                             None if classes is None else torch.tensor(classes, device=device), key)
            results[key] = dict(images=stats["count"], acc1=stats["acc1"], acc5=stats["acc5"])
            save()

    summary = summarize(results)
    print(f"\n{'set':<40} {'images':>8} {'top-1 %':>8} {'error %':>8}")
    for key, r in results.items():
        print(f"{key:<40} {r['images']:>8} {r['acc1']:>8.2f} {100 - r['acc1']:>8.2f}")
    for name, value in summary.items():
        if name != "corruption_error":
            print(f"imagenet-c {name}: {value:.2f}")
    save()
    destroy_distributed()
    return dict(results=results, **summary)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[get_args_parser()])
    main(parser.parse_args())
