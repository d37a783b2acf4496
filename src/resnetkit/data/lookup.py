"""Find a dataset by name: Fashion-MNIST (built in), MNIST-style IDX folders, CIFAR, folders."""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import urllib.request
from pathlib import Path
from typing import Literal

import torch

from ..errors import UserError
from .readers import ArrayDataset, ImageFolder, StreamedFolder, cifar_dataset, idx_dataset

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
FASHION_FILES = {  # file -> SHA-256 of its decompressed IDX bytes (independent of gzip level)
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "resnetkit"


def _has_files(d: Path) -> bool:
    return all((d / f).exists() or (d / f.removesuffix(".gz")).exists() for f in FASHION_FILES)


def _download_fashion(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name, digest in FASHION_FILES.items():
        target = dest / name
        if target.exists():
            continue
        with urllib.request.urlopen(FASHION_URL + name, timeout=30) as r:
            data = r.read()
        if hashlib.sha256(gzip.decompress(data)).hexdigest() != digest:
            raise UserError(f"downloaded {name} fails its SHA-256 check; not saved")
        tmp = target.with_suffix(".part")
        tmp.write_bytes(data)
        os.replace(tmp, target)


def find_fashion_mnist(root: str | Path | None = None, download: bool = True) -> Path:
    """The folder holding Fashion-MNIST's four files, searched in order: `root`,
    $RESNETKIT_DATA (or its fashion-mnist/ subfolder), Debian's /usr/share/datasets/fashion-mnist,
    the user cache (downloaded there with SHA-256 checks when online)."""
    tried: list[str] = []
    candidates = []
    if root:
        candidates.append(Path(root))
    if os.environ.get("RESNETKIT_DATA"):
        env = Path(os.environ["RESNETKIT_DATA"])
        candidates += [env, env / "fashion-mnist"]
    candidates += [DEBIAN_DIR, cache_dir() / "fashion-mnist"]
    for d in candidates:
        tried.append(str(d))
        if _has_files(d):
            return d
    if root:
        raise UserError(f"{root} does not hold the four Fashion-MNIST files "
                        f"({', '.join(FASHION_FILES)})")
    if download:
        dest = cache_dir() / "fashion-mnist"
        try:
            _download_fashion(dest)
            return dest
        except OSError as e:
            reason = str(getattr(e, "reason", e))
            raise UserError(
                "Fashion-MNIST not found; looked in " + ", ".join(tried) + f", and the download "
                f"failed ({reason}). Install it with `apt-get install dataset-fashion-mnist`, or "
                f"put the four *-ubyte.gz files in a folder and pass --data-dir or set "
                f"RESNETKIT_DATA") from None
    raise UserError("Fashion-MNIST not found; looked in " + ", ".join(tried))


def _idx_pair(d: Path, prefix: str) -> tuple[Path, Path]:
    def pick(stem: str) -> Path:
        for name in (stem + ".gz", stem):
            if (d / name).exists():
                return d / name
        return d / (stem + ".gz")
    return pick(f"{prefix}-images-idx3-ubyte"), pick(f"{prefix}-labels-idx1-ubyte")


def _verify(path: Path) -> None:
    digest = FASHION_FILES.get(path.name) or FASHION_FILES.get(path.name + ".gz")
    raw = path.read_bytes()
    raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    if digest and hashlib.sha256(raw).hexdigest() != digest:
        raise UserError(f"{path} does not match Fashion-MNIST's checksum (damaged or a "
                        f"different dataset); pass --dataset idx:{path.parent} to use it anyway")


DATASETS = ("fashion-mnist", "idx:DIR", "cifar:DIR", "folder:DIR")


def load_dataset(name: str, split: str, data_dir: str | None = None, image_size: int = 0,
                 in_chans: int = 3, on_bad: str = "skip", resize: int = 0,
                 interpolation: str = "bilinear") -> ArrayDataset | ImageFolder:
    """A dataset split ("train" or "test") by name: "fashion-mnist" (built in), "idx:DIR"
    (any MNIST-style folder), "cifar:DIR" (CIFAR-10/100 python batches), "folder:DIR"
    (DIR/train/CLASS/*.png and DIR/test/..., or DIR/CLASS/* for both splits; each image's
    shorter side resized to `resize`, default image_size, with `interpolation`, then
    centre-cropped to image_size)."""
    if split not in ("train", "test"):
        raise UserError(f"split must be train or test, got {split!r}")
    kind, _, path = name.partition(":")
    prefix = "train" if split == "train" else "t10k"
    if kind == "fashion-mnist":
        d = find_fashion_mnist(path or data_dir)
        images, labels = _idx_pair(d, prefix)
        for p in (images, labels):
            try:
                _verify(p)
            except (OSError, EOFError) as e:
                raise UserError(f"{p} is damaged or truncated ({e})") from None
        return idx_dataset(images, labels, FASHION_CLASSES)
    if kind == "idx" and path:
        images, labels = _idx_pair(Path(path), prefix)
        ds = idx_dataset(images, labels, [])
        n = int(ds.labels.max()) + 1 if len(ds.labels) else 0
        return ArrayDataset(ds.images, ds.labels, [str(i) for i in range(n)], ds.mean, ds.std)
    if kind == "cifar" and path:
        return cifar_dataset(path, split)
    if kind == "folder" and path:
        root = Path(path) / split if (Path(path) / split).is_dir() else Path(path)
        return ImageFolder(root, image_size or 224, in_chans, on_bad=on_bad, resize=resize,
                           interpolation=interpolation)
    raise UserError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}")


def select_classes(data: ArrayDataset, classes: list[int], per_class: int = 0,
                   seed: int = 0) -> ArrayDataset:
    """Only the given classes (renumbered from 0 in the order given), and at most per_class
    samples of each (a fixed random choice)."""
    if not classes and not per_class:
        return data
    if not isinstance(data, ArrayDataset):
        raise UserError("classes and per_class need a dataset held in memory (cache_images)")
    classes = classes or list(range(len(data.classes)))
    bad = [c for c in classes if c >= len(data.classes)]
    if bad or len(set(classes)) != len(classes):
        raise UserError(f"classes {classes}: need distinct indices below {len(data.classes)}")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    keep = [order[data.labels[order] == c][:per_class or None] for c in classes]
    idx = torch.cat(keep).sort().values
    remap = torch.full((len(data.classes),), -1, dtype=torch.long)
    remap[torch.tensor(classes)] = torch.arange(len(classes))
    return ArrayDataset(data.images[idx], remap[data.labels[idx]],
                        [data.classes[c] for c in classes], data.mean, data.std)


def restrict_to_classes(data: ArrayDataset, names: list[str] | None) -> ArrayDataset:
    """The samples of the named classes, labelled in the order of `names`, where a model was
    trained on a subset of the dataset's classes (`train --classes`, the transfer recipe):
    its checkpoint lists their names. Unchanged where the names are the dataset's own, or
    not all of them are the dataset's (the caller then compares the class counts)."""
    if not names or list(names) == list(data.classes) or not set(names) <= set(data.classes):
        return data
    if len(set(names)) != len(names):
        return data
    return select_classes(data, [list(data.classes).index(n) for n in names])


def materialize(ds: ArrayDataset | ImageFolder, workers: int = 2,
                classes: list[str] | None = None) -> ArrayDataset:
    """An in-memory uint8 copy; image folders are decoded by DataLoader workers. classes:
    names for the folder's classes, in its order, where there are as many (else the
    folder's own names are kept)."""
    if isinstance(ds, ArrayDataset):
        return ds
    own = list(getattr(ds, "classes", None) or [])  # a Subset has none: `classes` names them
    if classes and own and len(classes) != len(own):
        classes = own
    loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0))
    xs, ys = zip(*loader) if len(ds) else ((), ())
    return ArrayDataset(torch.cat(xs), torch.cat(ys), classes or own)


def memory_bytes() -> int:
    """Physical memory of this machine (0 where unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def fits_in_memory(n: int, shape: tuple[int, ...], share: float = 0.25,
                   total: int | None = None) -> bool:
    """Whether n decoded uint8 images of `shape` take at most `share` of the memory."""
    total = memory_bytes() if total is None else total
    return not total or n * math.prod(shape) <= share * total


def in_memory_or_streamed(ds: ArrayDataset | ImageFolder, cache: Literal["auto"] | bool = "auto",
                          workers: int = 2, classes: list[str] | None = None
                          ) -> ArrayDataset | StreamedFolder:
    """Array datasets as they are; an image folder decoded into memory (cache True, or
    "auto" when it takes at most a quarter of the memory) or streamed from disk on every
    pass (False, or "auto" when larger)."""
    if isinstance(ds, ArrayDataset):
        return ds
    shape = (ds.in_chans, ds.image_size, ds.image_size)
    if cache is True or (cache == "auto" and fits_in_memory(len(ds), shape)):
        return materialize(ds, workers, classes)
    return StreamedFolder(ds, workers, classes)
