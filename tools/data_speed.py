"""Reading speed of the data layouts (docs/data.md), in one process: the same images as files, as webdataset tar
shards, as a Hugging Face dataset saved with save_to_disk and as parquet files (converted to Arrow once, and, for
comparison, read straight from their row groups). For each: the listing or index time per 10,000 images, images/s of
one process (one DataLoader worker) reading the bytes and reading + decoding them in a shuffled order, and the files
it opened for that pass (an Arrow dataset maps its files once). The passes take turns between the layouts, the best
of three kept, so that a machine whose speed drifts gives each layout the same chances; each row's
decode_vs_files is its decoding speed over the files'.

    python tools/data_speed.py --synthetic 10000 --output_json data_speed.json
    python tools/data_speed.py --data_path /datasets/imagenet-subset
"""
import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import util.sources as sources  # noqa: E402
from util.datasets import read_image  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", help="an image folder (its train/ split if it has one)")
    parser.add_argument("--synthetic", type=int, default=0, help="or N smooth 500 x 375 JPEGs in 10 class folders")
    parser.add_argument("--shard_sizes", type=int, nargs="+", default=[1000, 25],
                        help="images per shard of the shard layouts (default: 1000, and 25 for more shards than "
                             "util.sources.MAX_OPEN_SHARDS)")
    parser.add_argument("--num_reads", type=int, default=2000, help="images read per layout and pass")
    parser.add_argument("--workdir", default=None, help="where the layouts are written (default: a temporary folder)")
    parser.add_argument("--output_json", default=None)
    return parser


def synthetic_folder(folder, count):
    rng = np.random.default_rng(0)
    for i in range(count):
        os.makedirs(os.path.join(folder, f"class_{i % 10}"), exist_ok=True)
        small = Image.fromarray(rng.integers(0, 256, (15, 20, 3), dtype=np.uint8))
        small.resize((500, 375), Image.BICUBIC).save(os.path.join(folder, f"class_{i % 10}", f"{i:06d}.jpg"),
                                                     quality=90)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def read_pass(images, order, decode):
    """Images/s of one pass."""
    read = functools.partial(read_image, images) if decode else images.read
    return len(order) / timed(lambda: [read(i) for i in order])[1]


def measure(layouts, num_reads, repeats=3):
    """layouts: (name, open_fn, files_opened(images, opened in the first pass)); one row each."""
    rows, opened = [], []
    for name, open_fn, files_opened in layouts:
        images, seconds = timed(open_fn)
        order = np.random.default_rng(0).permutation(len(images))[:num_reads]
        before = getattr(images, "opened", 0)
        first = read_pass(images, order, decode=False)  # the first pass: files opened as in an epoch
        rows.append(dict(layout=name, images=len(images), index_s_per_10k=seconds * 10000 / len(images),
                         read_images_per_s=first, decode_images_per_s=0.0,
                         files_opened=files_opened(images, getattr(images, "opened", 0) - before),
                         reads=len(order)))
        opened.append((images, order))
    for _ in range(repeats):  # in turns: each layout, then the next, and again
        for row, (images, order) in zip(rows, opened):
            row["read_images_per_s"] = max(row["read_images_per_s"], read_pass(images, order, decode=False))
            row["decode_images_per_s"] = max(row["decode_images_per_s"], read_pass(images, order, decode=True))
    for row in rows:
        row["decode_vs_files"] = row["decode_images_per_s"] / rows[0]["decode_images_per_s"]
        print(json.dumps(row), flush=True)
    return rows


def parquet_row_groups(files, num_reads):
    """Random reads straight from parquet: each decodes its whole row group (pyarrow has no row-level access)."""
    import pyarrow.parquet as pq
    readers = [pq.ParquetFile(f) for f in files]
    groups = [(r, g, r.metadata.row_group(g).num_rows) for r in readers for g in range(r.metadata.num_row_groups)]
    starts = np.cumsum([0] + [n for *_, n in groups])
    order = np.random.default_rng(0).permutation(starts[-1])[:num_reads]
    decoded, wanted = 0, 0

    def read(i):
        nonlocal decoded, wanted
        g = int(np.searchsorted(starts, i, side="right")) - 1
        reader, group, _ = groups[g]
        table = reader.read_row_group(group, columns=["image"])
        decoded += table.nbytes
        image = table.column("image")[int(i - starts[g])].as_py()["bytes"]
        wanted += len(image)
        return image
    _, seconds = timed(lambda: [read(i) for i in order])
    return dict(layout="parquet, row groups read directly", images=int(starts[-1]),
                read_images_per_s=len(order) / seconds, rows_per_group=float(np.mean([n for *_, n in groups])),
                bytes_decoded_per_byte_wanted=decoded / wanted)


def main(args):
    if not args.data_path and not args.synthetic:
        raise SystemExit("give --data_path or --synthetic N")
    sources.import_datasets()  # a one-line message when datasets is missing
    work = args.workdir or tempfile.mkdtemp(prefix="data_speed-")
    os.environ["LUT_DATA_CACHE"] = os.path.join(work, "cache")
    os.environ["HF_DATASETS_CACHE"] = os.path.join(work, "hf_cache")
    folder = args.data_path
    if args.synthetic:
        folder = os.path.join(work, "folder")
        synthetic_folder(os.path.join(folder, "train"), args.synthetic)
    layouts = [("image files", lambda: sources.open_images(folder, labelled=False), lambda _, __: args.num_reads)]
    for size in args.shard_sizes:
        out = os.path.join(work, f"wds_{size}")
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "pack_shards.py"), "--data_path", folder, "--out",
                        out, "--splits", "train", "--shard_size", str(size)], check=True, capture_output=True)
        shards = len(os.listdir(os.path.join(out, "train")))
        layouts.append((f"tar shards of {size} ({shards} shards)",
                        functools.partial(sources.open_images, out, labelled=False), lambda _, opened: opened))
    hf = datasets_of(folder, work)
    for name, key in (("save_to_disk (Arrow)", "saved"), ("parquet, converted to Arrow once", "parquet")):
        layouts.append((name, functools.partial(sources.open_images, hf[key], labelled=False),
                        lambda images, _: len(images.ds.cache_files)))
    rows = measure(layouts, args.num_reads)
    rows.append(parquet_row_groups(hf["parquet_files"], min(args.num_reads, 200)))
    print(json.dumps(rows, indent=1))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(dict(machine=os.uname().nodename, cpu_count=os.cpu_count(), rows=rows), f, indent=1)
    if not args.workdir:
        shutil.rmtree(work)


def datasets_of(folder, work):
    import datasets
    images = sources.open_images(folder, labelled=False)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})

    def rows():
        for i in range(len(images)):
            with open(images.open(i), "rb") as f:
                yield {"image": {"bytes": f.read(), "path": None},
                       "label": -1 if images.targets is None else int(images.targets[i])}
    ds = datasets.Dataset.from_generator(rows, features=features, cache_dir=os.path.join(work, "hf_build"))
    for name in ("saved", "parquet"):
        shutil.rmtree(os.path.join(work, name), ignore_errors=True)
    ds.save_to_disk(os.path.join(work, "saved"))
    os.makedirs(os.path.join(work, "parquet"))
    path = os.path.join(work, "parquet", "train-00000-of-00001.parquet")
    ds.to_parquet(path)  # datasets' own row groups for images (100 rows)
    return dict(saved=os.path.join(work, "saved"), parquet=os.path.join(work, "parquet"), parquet_files=[path])


if __name__ == "__main__":
    main(get_args_parser().parse_args())
