"""Where the images are: an image folder, tar shards or a Hugging Face dataset, each read by sample index (map-style),
so the resumable sampler, the per-sample augmentation seeds and the replacement of unreadable images work alike
for all of them (docs/data.md). The sample order is the folder's sorted class folders and file names, the shards'
sorted names (without .tar) and then their stored order, a dataset's stored order: the same images in the same order
give the same samples, labels and batches in any layout.

Listing a folder and indexing shards are done by one process per job and cached (LUT_DATA_CACHE, by default
~/.cache/lut-data), never inside the data folder: a later start or requeue only checks the cache against the files'
sizes and modification times, one stat per folder or shard."""
import collections
import functools
import hashlib
import io
import json
import os
import re
import socket
import tarfile
import time

import numpy as np

from util.dist import run_on_rank0_first

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
LAYOUTS = ("image files in class folders (<class>/<image>) or directly in the folder",
           "webdataset .tar shards (<key>.jpg with <key>.cls members)",
           "ImageNet's per-class train tars (<class>.tar)",
           "a Hugging Face dataset saved with save_to_disk",
           "Hugging Face parquet files (<split>-*.parquet, in the folder or its data/)",
           "hf:<name>, a Hugging Face dataset in the local cache")
MAX_OPEN_SHARDS = 256  # per process (DataLoader worker): the default `ulimit -n` is 1024
INDEX_VERSION = 1


def is_image_file(path):
    name = os.path.basename(path)  # hidden files such as macOS `._x.jpg` are skipped
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


class Strings:
    """A list of strings in one byte array: no Python object per item, so forked DataLoader workers share it
    instead of copying it page by page as reference counts change."""

    def __init__(self, items=(), blob=None, ends=None):
        if blob is None:
            encoded = [s.encode("utf-8", "surrogateescape") for s in items]  # any file name os.scandir gives
            blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
            ends = np.cumsum([len(b) for b in encoded], dtype=np.int64)
        self.blob, self.ends = blob, ends

    def __len__(self):
        return len(self.ends)

    def __getitem__(self, i):
        start = self.ends[i - 1] if i else 0
        return self.blob[start:self.ends[i]].tobytes().decode("utf-8", "surrogateescape")


class Images:
    """Samples by index. open(i): what PIL.Image.open reads (a path or a file object); name(i): the sample in
    messages; targets: int labels (None when the source has none); classes: their names (None when only numbers)."""
    targets = classes = None

    def __len__(self):
        raise NotImplementedError

    def open(self, i):
        raise NotImplementedError

    def name(self, i):
        raise NotImplementedError

    def read(self, i):
        """Sample i's bytes as stored."""
        source = self.open(i)
        if isinstance(source, str):
            with open(source, "rb") as f:
                return f.read()
        return source.read()


class FolderImages(Images):
    """Image files: paths (relative to root), their int targets (-1: none) and the class names."""

    def __init__(self, paths, targets=None, classes=None, root=""):
        self.root, self.paths = root, paths if isinstance(paths, Strings) else Strings(paths)
        self.targets = None if targets is None or (targets < 0).any() else targets
        self.classes = [str(c) for c in classes] if classes is not None and len(classes) else None

    def __len__(self):
        return len(self.paths)

    def open(self, i):
        return os.path.join(self.root, self.paths[i])

    name = open


class TarImages(Images):
    """Members of tar shards read by offset (os.pread: no file position shared between forked workers), at most
    MAX_OPEN_SHARDS shards open per process, the least recently read closed first. `opened` counts the opens."""

    def __init__(self, root, index):
        self.root, self.shards = root, [str(s) for s in index["shards"]]
        self.shard, self.offset, self.size = index["shard"], index["offset"], index["size"]
        self.members = Strings(blob=index["members"], ends=index["member_ends"])
        self.targets = index["targets"] if (index["targets"] >= 0).all() else None
        self.classes = [str(c) for c in index["classes"]] or None
        self._fds, self._pid, self.opened = collections.OrderedDict(), os.getpid(), 0

    def __len__(self):
        return len(self.shard)

    def __getstate__(self):  # a spawned worker opens its own files
        return {**self.__dict__, "_fds": collections.OrderedDict(), "_pid": None}

    def _fd(self, shard):
        if self._pid != os.getpid():  # a forked worker: its copies of the parent's descriptors are closed
            for fd in self._fds.values():
                os.close(fd)
            self._fds, self._pid = collections.OrderedDict(), os.getpid()
        fd = self._fds.pop(shard, None)
        if fd is None:
            if len(self._fds) >= MAX_OPEN_SHARDS:
                os.close(self._fds.popitem(last=False)[1])
            fd = os.open(os.path.join(self.root, self.shards[shard]), os.O_RDONLY)
            self.opened += 1
        self._fds[shard] = fd
        return fd

    def open(self, i):
        size = int(self.size[i])
        data = os.pread(self._fd(self.shard[i]), size, int(self.offset[i]))
        if len(data) < size:
            raise OSError("it ends past the end of its shard: the shard is truncated")
        return io.BytesIO(data)

    def name(self, i):
        return f"{os.path.join(self.root, self.shards[self.shard[i]])}:{self.members[i]}"


class HFImages(Images):
    """A Hugging Face dataset's image column, decoded by load_image (not by `datasets`), and its label column."""

    def __init__(self, ds, source, labelled=True, image_column=None, label_column=None):
        import datasets
        features = ds.features
        found = [c for c, f in features.items() if isinstance(f, datasets.Image)]
        image_column = image_column or (found[0] if len(found) == 1 else None)
        if image_column not in features:
            what = f"no column {image_column!r}" if image_column else f"{len(found)} Image columns"
            raise ValueError(f"{source}: {what} (its columns: {', '.join(features)}): name the images with "
                             f"--image_column")
        if label_column is None:
            label_column = next((c for c, f in features.items() if isinstance(f, datasets.ClassLabel)),
                                "label" if "label" in features else None)
        elif label_column not in features:
            raise ValueError(f"{source} has no column {label_column!r} (its columns: {', '.join(features)})")
        if labelled and label_column is not None:  # from Arrow at once, not row by row
            self.targets = ds.select_columns([label_column]).data.column(0).to_numpy().astype(np.int64)
            names = getattr(features[label_column], "names", None)
            self.classes = list(names) if names else None
        self.source, self.column = source, image_column
        if not isinstance(features[image_column], datasets.Image):
            raise ValueError(f"{source}: column {image_column!r} holds {features[image_column]}, not images")
        self.ds = ds.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))

    def __len__(self):
        return len(self.ds)

    def open(self, i):
        image = self.ds[int(i)][self.column]
        return io.BytesIO(image["bytes"]) if image["bytes"] is not None else image["path"]

    def name(self, i):
        return f"{self.source} sample {i}"


def add_source_args(parser, labelled):
    """--data_path and the columns of a Hugging Face dataset."""
    parser.add_argument("--data_path", required=True,
                        help=f"images{' with train and val splits' if labelled else ''}: a folder (of images, class "
                             "folders, tar shards or parquet files), a save_to_disk dataset or hf:<name> "
                             "(docs/data.md)")
    parser.add_argument("--image_column", default=None,
                        help="a Hugging Face dataset's image column (default: its one Image feature)")
    parser.add_argument("--label_column", default=None,
                        help="a Hugging Face dataset's label column (default: its ClassLabel feature, else 'label')")


def open_images(root, split="train", labelled=True, image_column=None, label_column=None):
    """The Images of `root`'s split: the folder root/<split> (root/validation for "val") in any layout of LAYOUTS,
    else the .tar or .parquet files of root or root/data with the split in their name (train-00000-of-00294.parquet,
    imagenet1k-train-0000.tar), the split of hf:<name>; for unlabelled training images (pre-training), root itself
    when it has none of these. Raises FileNotFoundError / ValueError naming what is missing."""
    columns = dict(image_column=image_column, label_column=label_column)
    splits = [split, "validation"] if split == "val" else [split]
    if root.startswith("hf:"):
        return hf_cached(root[3:], splits, labelled, **columns)
    if not os.path.exists(root):
        raise FileNotFoundError(f"data path {root} does not exist")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"data path {root} is not a folder")
    for name in splits:
        if os.path.isdir(os.path.join(root, name)):
            return open_folder(os.path.join(root, name), labelled, **columns)
    for folder in (root, os.path.join(root, "data")):
        files = split_files(folder, splits)
        if any(name.endswith(".parquet") for name in files):
            return hf_parquet([os.path.join(folder, n) for n in files if n.endswith(".parquet")],
                              f"{folder} ({split} parquet files)", labelled, split, **columns)
        if files:
            return open_shards(folder, files, split, names_are_classes=False)
    if os.path.isfile(os.path.join(root, "state.json")) and (split != "train" or labelled):
        raise ValueError(f"{root} is one Hugging Face dataset without splits: save a DatasetDict with train and "
                         f"validation splits")
    if split != "train" or labelled:
        raise FileNotFoundError(f"{root}/{split} does not exist, nor has {root} {split} .tar or .parquet files; "
                                f"accepted layouts: " + "; ".join(LAYOUTS))
    return open_folder(root, labelled, **columns)


def split_files(folder, splits):
    """Sorted .tar and .parquet files of `folder` with a split's name as a word of theirs (split by - _ .)."""
    if not os.path.isdir(folder):
        return []
    return sorted((e.name for e in os.scandir(folder) if e.name.endswith((".tar", ".parquet"))
                   and not e.name.startswith(".") and set(splits) & set(re.split(r"[-_.]", e.name))), key=stem)


def stem(name):
    return os.path.splitext(name)[0]


def open_folder(folder, labelled, **columns):
    """A folder's Images: a save_to_disk dataset, its parquet files, its tar shards, or its image files."""
    if os.path.isfile(os.path.join(folder, "state.json")):
        return hf_saved(folder, labelled, **columns)
    entries = [e for e in os.scandir(folder) if not e.name.startswith(".")]
    archives = sorted((e.name for e in entries if e.name.endswith((".parquet", ".tar")) and e.is_file()), key=stem)
    if archives and any(e.is_dir() or is_image_file(e.name) for e in entries):
        raise ValueError(f"{folder} holds both .tar or .parquet files and image files or folders: move one kind "
                         f"away (accepted layouts: " + "; ".join(LAYOUTS) + ")")
    if any(name.endswith(".parquet") for name in archives):
        return hf_parquet([os.path.join(folder, n) for n in archives if n.endswith(".parquet")], folder, labelled,
                          os.path.basename(folder), **columns)
    if archives:  # ImageNet's <class>.tar when no shard holds .cls labels
        return open_shards(folder, archives, "all", names_are_classes=len(archives) > 1)
    index = cached_index(folder, "folder", folder_signature(folder), list_folder)
    images = FolderImages(Strings(blob=index["paths"], ends=index["path_ends"]), index["targets"], index["classes"],
                          root=folder)
    if labelled and images.classes is None:
        raise ValueError(f"{folder} has no class folders (<class>/<image>), so no labels")
    return images


def open_shards(folder, names, tag, names_are_classes):
    """TarImages of the shards `names` of `folder` (tag: which of its shards, in the cache's name)."""
    signature = []
    for name in names:  # a rewritten shard changes its size or modification time
        st = os.stat(os.path.join(folder, name))
        signature.append([name, st.st_size, st.st_mtime_ns])
    build = functools.partial(index_shards, names_are_classes=names_are_classes)
    return TarImages(folder, cached_index(folder, f"shards-{tag}", signature, build))


def no_images(folder):
    return ValueError(f"no images found in {folder}; accepted layouts: " + "; ".join(LAYOUTS))


# ---------------------------------------------------------------- the cached listing and shard index

def cache_path(folder, kind):
    base = os.environ.get("LUT_DATA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lut-data")
    digest = hashlib.sha1(os.path.realpath(folder).encode()).hexdigest()[:16]
    return os.path.join(base, f"{os.path.basename(os.path.normpath(folder))}-{kind}-{digest}.npz")


def folder_signature(folder):
    """(folder, mtime) of `folder` and its sub-folders: adding, removing or renaming an image changes its folder's."""
    dirs = [folder] + sorted(e.path for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    return [[os.path.relpath(d, folder), os.stat(d).st_mtime_ns] for d in dirs]


def cached_index(folder, kind, signature, build):
    """build(folder, signature)'s arrays, from the cache when it was built from the same files; built once per job,
    by rank 0 while the other ranks wait for it (however long: not bound by --dist_timeout)."""
    path = cache_path(folder, kind)
    key = json.dumps([INDEX_VERSION, signature])

    def load():
        try:
            with np.load(path, allow_pickle=False) as f:
                index = dict(f)
        except Exception:  # missing, or damaged: built again
            return None
        if str(index.pop("key")) == key:
            return index
        print(f"WARNING: the index {path} is stale ({stale_entry(index, signature)} changed since it was built); "
              f"building it again", flush=True)
        return None

    def load_or_build():
        index = load()
        if index is None:
            start = time.time()
            index = build(folder, signature)
            print(f"{folder}: {len(index['targets'])} images {'listed' if kind == 'folder' else 'indexed'} in "
                  f"{time.time() - start:.1f} s, cached in {path}", flush=True)
            write_index(path, index, key)
        return index
    return run_on_rank0_first(load_or_build)


def stale_entry(index, signature):
    """The first folder or shard of `signature` that differs from the one the stale `index` was built from."""
    old = {str(name): rest for name, *rest in json.loads(str(index.get("signature", "[]")))}
    new = {name: rest for name, *rest in signature}
    changed = [name for name in new if old.get(name) != new[name]] + sorted(set(old) - set(new))
    return changed[0] if changed else "the index format"


def write_index(path, index, key):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{socket.gethostname()}-{os.getpid()}.tmp.npz"
    try:
        np.savez(tmp, key=key, **index)
        os.replace(tmp, path)
    except OSError as e:
        raise SystemExit(f"cannot write the data index {path}: {e.strerror}; set LUT_DATA_CACHE to a folder you "
                         f"can write") from None


class Progress:
    """A line every 10 s while `folder`'s entries are read: files or folders done of the total, images so far."""

    def __init__(self, folder, total, unit):
        self.folder, self.total, self.unit, self.start = folder, total, unit, time.time()
        self.last = self.start

    def __call__(self, done, images):
        if time.time() - self.last > 10:
            self.last = time.time()
            print(f"{self.folder}: {done}/{self.total} {self.unit}, {images} images, {self.last - self.start:.0f} s",
                  flush=True)


def list_folder(folder, signature):
    """Image paths relative to `folder`: those directly in it (label -1), then those of each sub-folder (a class,
    labelled by its rank among the sorted folder names), each sorted by file name; hidden files and folders
    skipped."""
    classes, found, progress = [d for d, _ in signature[1:]], [], Progress(folder, len(signature), "folders")
    for label, (c, _) in enumerate(signature):
        found += [(os.path.join(c, e.name) if c != "." else e.name, label - 1)
                  for e in os.scandir(os.path.join(folder, c)) if e.is_file() and is_image_file(e.name)]
        progress(label + 1, len(found))
    found.sort(key=lambda item: (item[1], item[0]))
    if not found:
        raise no_images(folder)
    paths, targets = [p for p, _ in found], np.array([t for _, t in found], dtype=np.int64)
    strings = Strings(paths)
    return dict(paths=strings.blob, path_ends=strings.ends, targets=targets, classes=np.array(classes, dtype=str),
                signature=json.dumps(signature))


def index_shards(folder, signature, names_are_classes):
    """Each shard's image members in stored order: their offsets and sizes, labels from <key>.cls members, or where
    no shard has any and names_are_classes, the rank of the shard's name (ImageNet's <class>.tar); else none."""
    samples, cls, progress = [], {}, Progress(folder, len(signature), "shards")  # samples: (shard, key, member)
    for s, (name, *_) in enumerate(signature):
        progress(s, len(samples))
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for member in tar:
                    base = os.path.basename(member.name)
                    if not member.isfile() or base.startswith("."):
                        continue
                    key = os.path.join(os.path.dirname(member.name), base.split(".", 1)[0])
                    if base.lower().endswith(".cls"):
                        text = tar.extractfile(member).read().decode("utf-8", "replace").strip()
                        if not re.fullmatch(r"-?\d+", text):
                            raise ValueError(f"{path}: {member.name} holds {text[:20]!r}, not an integer label")
                        cls[s, key] = int(text)
                    elif is_image_file(base) and not (samples and samples[-1][:2] == (s, key)):
                        samples.append((s, key, member))  # a sample's first image member
                end = tar.offset
                check_end(f, end)
        except tarfile.TarError as e:
            raise ValueError(f"{path} is truncated or damaged ({e}): re-copy it or move it away") from None
    if not samples:
        raise no_images(folder)
    classes = [stem(name) for name, *_ in signature] if names_are_classes and not cls else []
    if cls:
        targets = [cls.get((s, key), -1) for s, key, _ in samples]
    else:
        targets = [s if classes else -1 for s, _, _ in samples]
    strings = Strings(member.name for _, _, member in samples)
    return dict(shards=np.array([name for name, *_ in signature], dtype=str),
                shard=np.array([s for s, _, _ in samples], dtype=np.int32),
                offset=np.array([m.offset_data for _, _, m in samples], dtype=np.int64),
                size=np.array([m.size for _, _, m in samples], dtype=np.int64), members=strings.blob,
                member_ends=strings.ends, targets=np.array(targets, dtype=np.int64),
                classes=np.array(classes, dtype=str), signature=json.dumps(signature))


def check_end(f, end):
    """What follows a tar's last member at `end` must be zeros (two zero blocks, then padding): tarfile takes a
    damaged header, or a second archive appended with cat, for the end of the archive."""
    f.seek(end)
    zeros = 0
    while chunk := f.read(1 << 20):
        if chunk.strip(b"\0"):
            raise tarfile.ReadError(f"data past the end of the archive at byte {end}: a damaged header or a second "
                                    f"archive")
        zeros += len(chunk)
    if zeros < 2 * tarfile.BLOCKSIZE:
        raise tarfile.ReadError("unexpected end of data")


# ---------------------------------------------------------------- Hugging Face datasets

def import_datasets():
    """datasets, offline unless HF_HUB_OFFLINE says otherwise: the data is local, and a node without network would
    wait for the Hub's retries."""
    offline = os.environ.setdefault("HF_HUB_OFFLINE", "1") == "1"
    try:
        import datasets
        import huggingface_hub.constants
    except ImportError:
        raise SystemExit("reading a Hugging Face dataset needs the datasets package: pip install datasets") from None
    if offline:  # huggingface_hub may have read the variable before it was set (timm imports it)
        huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    return datasets


def hf_saved(folder, labelled, **columns):
    datasets = import_datasets()
    return HFImages(datasets.load_from_disk(folder), folder, labelled, **columns)


def hf_parquet(files, source, labelled, split, **columns):
    """Parquet files, converted once to Arrow in the Hugging Face cache (HF_DATASETS_CACHE) by rank 0 while the
    others wait: reading one image from parquet decodes its whole row group (docs/data.md)."""
    datasets = import_datasets()
    split = re.sub(r"\W", "_", split) or "train"  # the name its progress bars show
    ds = run_on_rank0_first(lambda: datasets.load_dataset("parquet", data_files={split: files}, split=split))
    return HFImages(ds, source, labelled, **columns)


def hf_cached(name, splits, labelled, **columns):
    """hf:<name>: the Arrow data that datasets.load_dataset(name) prepared, else the parquet files of the snapshot
    that huggingface_hub downloaded (huggingface-cli download --repo-type dataset <name>)."""
    datasets = import_datasets()
    for split in splits:
        try:
            ds = run_on_rank0_first(lambda: datasets.load_dataset(name, split=split))
        except (ConnectionError, FileNotFoundError, ValueError):  # not prepared, or no such split
            continue
        return HFImages(ds, f"hf:{name}[{split}]", labelled, **columns)
    from huggingface_hub import snapshot_download
    try:
        root = snapshot_download(name, repo_type="dataset", local_files_only=True)
    except Exception:  # huggingface_hub's LocalEntryNotFoundError and kin
        raise FileNotFoundError(f"hf:{name}: no split {' or '.join(splits)} of this dataset in the local Hugging Face "
                                f"cache; download it first, or pass its folder") from None
    return open_images(root, splits[0], labelled, **columns)
