"""Pack the images of --data_path (any layout util.sources reads: a folder, class tars, a Hugging Face dataset) into
webdataset .tar shards: <out>/<split>/shard-000000.tar, ..., each member <key>.<ext> (the image's bytes, unchanged)
with <key>.cls (its label) where the split has labels. The shards hold the samples in the source's order, so a run
on them sees the same images, labels and batches as on the source (docs/data.md).

    python tools/pack_shards.py --data_path /datasets/imagenet --out /datasets/imagenet-wds --shard_size 1250
"""
import argparse
import io
import os
import sys
import tarfile
import time

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from util.sources import IMAGE_EXTENSIONS, open_images  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", required=True)
    parser.add_argument("--out", required=True, help="folder for the <split>/ folders of shards (created)")
    parser.add_argument("--splits", nargs="+", default=["train", "val"],
                        help="splits to pack (default: train val, those that exist)")
    parser.add_argument("--shard_size", type=int, default=1000, help="images per shard (default 1000)")
    parser.add_argument("--image_column", default=None, help="a Hugging Face dataset's image column")
    parser.add_argument("--label_column", default=None, help="a Hugging Face dataset's label column")
    return parser


def image_bytes(images, i):
    """(bytes, extension) of sample i as stored."""
    data, ext = images.read(i), os.path.splitext(images.name(i))[1].lower()
    if ext not in IMAGE_EXTENSIONS:  # a dataset's bytes carry no name: the format decides
        with Image.open(io.BytesIO(data)) as img:
            ext = "." + (img.format or "png").lower().replace("jpeg", "jpg")
    return data, ext


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def pack(images, folder, shard_size):
    if os.path.isdir(folder) and os.listdir(folder):
        raise SystemExit(f"{folder} is not empty: shards left there would be read with the new ones; remove it or "
                         f"choose another --out")
    os.makedirs(folder, exist_ok=True)
    start, shards = time.time(), -(-len(images) // shard_size)
    for s in range(shards):
        path = os.path.join(folder, f"shard-{s:06d}.tar")
        with tarfile.open(path + ".tmp", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(s * shard_size, min((s + 1) * shard_size, len(images))):
                data, ext = image_bytes(images, i)
                add(tar, f"{i:09d}{ext}", data)
                if images.targets is not None:
                    add(tar, f"{i:09d}.cls", str(int(images.targets[i])).encode())
        os.replace(path + ".tmp", path)
        print(f"{path}: {min((s + 1) * shard_size, len(images))} of {len(images)} images, "
              f"{time.time() - start:.0f} s", flush=True)


def main(args):
    if args.shard_size < 1:
        raise SystemExit("--shard_size must be positive")
    packed = 0
    for split in args.splits:
        try:
            images = open_images(args.data_path, split, labelled=False, image_column=args.image_column,
                                 label_column=args.label_column)
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            raise SystemExit(f"--data_path: {e}") from None
        pack(images, os.path.join(args.out, split), args.shard_size)
        packed += 1
    if not packed:
        raise SystemExit(f"--data_path {args.data_path} has none of the splits {', '.join(args.splits)}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
