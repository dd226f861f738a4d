"""Write the committed Fashion-MNIST demo subset (data/fashion_mnist_demo.npz) as an ImageFolder.

    python tools/make_demo_data.py --out ./data/demo

gives OUT/train/<class>/<index>.png (300 per class) and OUT/val/<class>/<index>.png (100 per class): 28x28 RGB PNGs,
named by their index in the original Fashion-MNIST file. A split that is already complete is left alone.
See data/README.md for where the images come from.
"""
import argparse
import os
import shutil

import numpy as np
from PIL import Image

NPZ = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "fashion_mnist_demo.npz")


def expected_files(data, split):
    """{class_name: sorted PNG file names} of one split."""
    names = data["class_names"]
    files = {str(c): [] for c in names}
    for label, index in zip(data[f"{split}_labels"], data[f"{split}_source_index"]):
        files[str(names[label])].append(f"{index:05d}.png")
    return {c: sorted(f) for c, f in files.items()}


def is_complete(split_dir, files):
    return all(
        os.path.isdir(os.path.join(split_dir, c)) and sorted(os.listdir(os.path.join(split_dir, c))) == f
        for c, f in files.items()
    )


def write_split(data, split, out):
    """Write one split into a temporary folder, then rename it, so an interrupted run leaves no partial split."""
    split_dir = os.path.join(out, split)
    files = expected_files(data, split)
    if os.path.isdir(split_dir):
        if is_complete(split_dir, files):
            print(f"{split_dir} is complete, skipping")
            return
        raise FileExistsError(f"{split_dir} exists but is not the demo data; remove it or choose another --out")
    tmp = split_dir + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted run
    names = data["class_names"]
    for c in names:
        os.makedirs(os.path.join(tmp, str(c)))
    for img, label, index in zip(data[f"{split}_images"], data[f"{split}_labels"], data[f"{split}_source_index"]):
        Image.fromarray(img).convert("RGB").save(os.path.join(tmp, str(names[label]), f"{index:05d}.png"))
    os.rename(tmp, split_dir)
    print(f"wrote {len(data[f'{split}_labels'])} images to {split_dir}")


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
