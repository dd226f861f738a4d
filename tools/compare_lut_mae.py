"""Pre-train LUT and MAE with the same budget on the same data, then compare them by k-NN and linear probing.

    python tools/compare_lut_mae.py                 # the demo data, ViT-tiny at 32 px (sized for one GPU)
    python tools/compare_lut_mae.py --data_path /imagenet100 --size small --input_size 224 --patch_size 16 \
        --epochs 200 --batch_size 256 --probe_epochs 90 --launcher "torchrun --nproc_per_node=8" --output_dir out/cmp

Both methods get the same images, seed, epochs, batch, input size, mask ratio and lr rule, then main_knn.py and
main_linprobe.py on CLS-token and mean-patch-token features (last probe epoch). Every step is an ordinary run of a
training script in output_dir/<method>/..., so an interrupted comparison resumes; the table also goes to
output_dir/results.json. On a CPU, shrink the budget (e.g. --patch_size 8 --epochs 5) and set OMP_NUM_THREADS.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from util.checkpoint import last_checkpoint  # noqa: E402
# CLS token, or the mean of the final-norm patch tokens (LUT's global vector), in main_knn.py and main_linprobe.py
POOLS = {"token": [], "avg": ["--lut_global"]}
COLUMNS = {"method": "method", "pretrain_minutes": "pre-train min", "pretrain_loss": "final loss",
           "knn_token": "k-NN cls", "knn_avg": "k-NN avg", "linprobe_token": "linear cls", "linprobe_avg": "linear avg"}


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", default=os.path.join(ROOT, "data", "demo"),
                        help="ImageFolder root with train/<class>/ and val/<class>/ (default: the demo data)")
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "output_dir", "compare_lut_mae"))
    parser.add_argument("--size", default="tiny", choices=["tiny", "small", "base", "large"], help="ViT size")
    parser.add_argument("--input_size", default=32, type=int)
    parser.add_argument("--patch_size", default=4, type=int)
    parser.add_argument("--epochs", default=20, type=int, help="pre-training epochs, for both methods")
    parser.add_argument("--warmup_epochs", default=2, type=int, help="pre-training warm-up epochs")
    parser.add_argument("--batch_size", default=64, type=int, help="pre-training images per process")
    parser.add_argument("--blr", default=1.5e-3, type=float,
                        help="pre-training base lr (the recipes' 1.5e-4 suits batch 4096, 1600 epochs; not short runs)")
    parser.add_argument("--head_mlp_dim", default=1024, type=int, help="LUT projector / predictor width (recipe: 4096)")
    parser.add_argument("--probe_epochs", default=10, type=int)
    parser.add_argument("--probe_batch_size", default=64, type=int)
    parser.add_argument("--probe_lr", default=5.0, type=float,
                        help="absolute LARS lr of the linear probe (MAE's protocol: 0.1 x 16384 / 256 = 6.4)")
    parser.add_argument("--num_workers", default=4, type=int)
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--launcher", default=sys.executable,
                        help="how to start each script, e.g. 'torchrun --nproc_per_node=8' (default: this python)")
    parser.add_argument("--extra_args", default="", help="more flags for every script, e.g. '--device cpu'")
    return parser


def run(script, flags, args):
    cmd = [*shlex.split(args.launcher), os.path.join(ROOT, script), *map(str, flags), *shlex.split(args.extra_args)]
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def last_record(path):
    with open(path) as f:
        return json.loads(f.read().splitlines()[-1])


def evaluate_method(method, args):
    """Pre-train `method` ('lut' or 'mae'), then k-NN and linear-probe it; returns its row of the table."""
    out = os.path.join(args.output_dir, method)
    common = ["--input_size", args.input_size, "--patch_size", args.patch_size, "--num_workers", args.num_workers,
              "--data_path", args.data_path]
    start = time.time()
    pretrain = ["--model", f"{method}_vit_{args.size}_patch16", "--epochs", args.epochs, "--warmup_epochs",
                args.warmup_epochs, "--batch_size", args.batch_size, "--blr", args.blr, "--seed", args.seed,
                # The same lr rule for both methods: otherwise their lrs differ at any batch but 4096.
                "--lr_scale", "linear", "--output_dir", out]
    if method == "lut":
        pretrain += ["--head_mlp_dim", args.head_mlp_dim]
    run("main_pretrain.py", common + pretrain, args)
    row = {"method": method.upper(), "pretrain_minutes": (time.time() - start) / 60,
           "pretrain_loss": last_record(os.path.join(out, "log.txt"))["train_loss"]}
    encoder = ["--model", f"vit_{args.size}_patch16", "--finetune", last_checkpoint(out)]
    for pool, pool_flags in POOLS.items():
        knn_dir = os.path.join(out, f"knn_{pool}")
        run("main_knn.py", common + encoder + pool_flags + ["--output_dir", knn_dir], args)
        with open(os.path.join(knn_dir, "knn.json")) as f:
            row[f"knn_{pool}"] = json.load(f)["knn_top1"]
        probe_dir = os.path.join(out, f"linprobe_{pool}")
        run("main_linprobe.py", common + encoder + pool_flags + [
            "--epochs", args.probe_epochs, "--warmup_epochs", max(1, args.probe_epochs // 9), "--batch_size",
            args.probe_batch_size, "--lr", args.probe_lr, "--seed", args.seed, "--dist_eval", "--output_dir",
            probe_dir], args)
        row[f"linprobe_{pool}"] = last_record(os.path.join(probe_dir, "log.txt"))["test_acc1"]
    return row


def main(args):
    if args.data_path == get_args_parser().get_default("data_path") and not os.path.isdir(args.data_path):
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_demo_data.py"), "--out", args.data_path],
                       check=True)
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(args.data_path, split)):
            raise SystemExit(f"--data_path needs {split}/<class>/ folders: {os.path.join(args.data_path, split)} "
                             f"does not exist")
    os.makedirs(args.output_dir, exist_ok=True)
    rows = [evaluate_method(method, args) for method in ("lut", "mae")]
    table = [" | ".join(COLUMNS.values()), " | ".join("---" for _ in COLUMNS)]
    table += [" | ".join(str(row[k]) if isinstance(row[k], str) else f"{row[k]:.2f}" for k in COLUMNS) for row in rows]
    print(f"\nLUT vs MAE, ViT-{args.size}, {args.epochs} pre-training epochs on {args.data_path} "
          f"(top-1 %, last epoch / k = 20):", *table, sep="\n")
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"args": vars(args), "results": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
