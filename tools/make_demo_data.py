"""Write the committed Fashion-MNIST demo subset (data/fashion_mnist_demo.npz) as an ImageFolder.

    python tools/make_demo_data.py --out ./data/demo

gives OUT/train/<class>/<index>.png (300 per class) and OUT/val/<class>/<index>.png (100 per class): 28x28 RGB PNGs,
named by their index in the original Fashion-MNIST file (data/README.md). A complete split is left alone.
"""
import argparse
import os
import shutil

import numpy as np
from PIL import Image

NPZ = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "fashion_mnist_demo.npz")


def write_split(data, split, out):
    """Write one split into a temporary folder, then rename it, so an interrupted run leaves no partial split."""
    names = [str(c) for c in data["class_names"]]
    images = list(zip(data[f"{split}_images"], data[f"{split}_labels"], data[f"{split}_source_index"]))
    split_dir = os.path.join(out, split)
    if os.path.isdir(split_dir):
        expected = {c: sorted(f"{index:05d}.png" for _, label, index in images if names[label] == c) for c in names}
        if all(os.path.isdir(os.path.join(split_dir, c)) and sorted(os.listdir(os.path.join(split_dir, c))) == files
               for c, files in expected.items()):
            print(f"{split_dir} is complete, skipping")
            return
        raise FileExistsError(f"{split_dir} exists but is not the demo data; remove it or choose another --out")
    tmp = split_dir + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted run
    for c in names:
        os.makedirs(os.path.join(tmp, c))
    for img, label, index in images:
        Image.fromarray(img).convert("RGB").save(os.path.join(tmp, names[label], f"{index:05d}.png"))
    os.rename(tmp, split_dir)
    print(f"wrote {len(images)} images to {split_dir}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="./data/demo", help="output folder (default ./data/demo)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    with np.load(NPZ) as npz:
        data = dict(npz)
    for split in ("train", "val"):
        write_split(data, split, args.out)


if __name__ == "__main__":
    main()
