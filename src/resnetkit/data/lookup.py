"""Find a dataset by name: Fashion-MNIST (built in), MNIST-style IDX folders, CIFAR, folders."""
from __future__ import annotations

import copy
import gzip
import hashlib
import math
import os
import urllib.request
from pathlib import Path
from typing import Literal

import torch

from ..errors import UserError
from ..untrusted import regular_file, shown
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
    """The folder holding Fashion-MNIST's four files: `root` when given (a UserError when it
    does not hold them: a folder the user named is never silently swapped for another),
    else searched in order: $RESNETKIT_DATA (or its fashion-mnist/ subfolder), Debian's
    /usr/share/datasets/fashion-mnist, the user cache (downloaded there with SHA-256 checks
    when online)."""
    tried: list[str] = []
    candidates = []
    if root:
        if _has_files(Path(root)):
            return Path(root)
        raise UserError(f"{shown(root)} does not hold the four Fashion-MNIST files "
                        f"({', '.join(FASHION_FILES)})")
    if os.environ.get("RESNETKIT_DATA"):
        env = Path(os.environ["RESNETKIT_DATA"])
        candidates += [env, env / "fashion-mnist"]
    candidates += [DEBIAN_DIR, cache_dir() / "fashion-mnist"]
    for d in candidates:
        tried.append(str(d))
        if _has_files(d):
            return d
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
    raw = regular_file(path, "dataset file").read_bytes()
    raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    if digest and hashlib.sha256(raw).hexdigest() != digest:
        raise UserError(f"{path} does not match Fashion-MNIST's checksum (damaged or a "
                        f"different dataset); pass --dataset idx:{path.parent} to use it anyway")


DATASETS = ("fashion-mnist", "idx:DIR", "cifar:DIR", "folder:DIR")
Dataset = ArrayDataset | ImageFolder | StreamedFolder


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


def _unnamed(classes: list[str]) -> bool:
    """Whether a dataset's class names are only its label numbers (an IDX folder's)."""
    return list(classes) == [str(i) for i in range(len(classes))]


def _listed(names: list[str], most: int = 10) -> str:
    return ", ".join(shown(n) for n in names[:most]) + (" ..." if len(names) > most else "")


def match_classes(data: Dataset, names: list[str] | None, num_classes: int | None = None,
                  dataset: str = "the dataset", theirs: str = "the model",
                  subset: bool = True) -> Dataset:
    """`data` labelled by `names` (a model's classes, in its order), matched by name: the
    one place where a dataset's classes meet a model's. Label i of the result means
    names[i] and its classes are `names`; a dataset of fewer classes keeps its samples, each
    under its own class's new index. With `subset`, a model that knows some of the dataset's
    classes (all of its names among them: `train --classes`, the transfer recipe) is judged
    on the samples of those classes only; otherwise a dataset class that `names` lacks is a
    UserError naming it. Without names (or against an IDX folder, whose classes are only
    numbers, when none of the names is one of them) the order is the dataset's own and the
    class counts must agree (`num_classes`, else len(names)).

    data: an ArrayDataset, an ImageFolder (relabelled before anything is decoded) or a
    StreamedFolder; dataset and theirs name the two sides in messages."""
    own = list(data.classes)
    if names is not None:
        names = list(names)
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise UserError(f"{theirs} names class {shown(repr(twice[0]))} more than once, so "
                            f"its classes cannot be matched to {shown(dataset)}'s by name")
    if not names or own == names or (_unnamed(own) and not set(own) & set(names)):
        want = num_classes if num_classes is not None else len(names) if names else None
        if want is not None and len(own) != want:
            raise UserError(f"dataset {shown(dataset)} has {len(own)} classes, {theirs} {want}")
        return data
    unknown = [c for c in own if c not in names]
    if unknown and not (subset and set(names) <= set(own)):
        s = "es" if len(unknown) > 1 else ""
        raise UserError(f"dataset {shown(dataset)} has class{s} {_listed(unknown)}, which "
                        f"{theirs} does not know (its classes: {_listed(names)}); use a "
                        f"dataset of {theirs}'s classes")
    index = {n: i for i, n in enumerate(names)}
    remap = torch.tensor([index.get(c, -1) for c in own], dtype=torch.long)
    return _relabel(data, remap, names)


def _relabel(data: Dataset, remap: torch.Tensor, names: list[str]) -> Dataset:
    """`data` with label l turned into remap[l] and its samples of remap -1 left out."""
    if isinstance(data, ArrayDataset):
        y = remap[data.labels]
        keep = y >= 0
        if bool(keep.all()):
            return ArrayDataset(data.images, y, names, data.mean, data.std)
        # the statistics stay the whole set's (see select_classes)
        return ArrayDataset(data.images[keep], y[keep], names, data.mean, data.std)
    samples = [(p, int(remap[label])) for p, label in data.samples if remap[label] >= 0]
    if isinstance(data, StreamedFolder):
        return StreamedFolder(data.folder, data.workers, names, samples)
    if isinstance(data, ImageFolder):
        out = copy.copy(data)
        out.samples, out.classes = samples, list(names)
        return out
    raise TypeError(f"cannot relabel a {type(data).__name__}")


def restrict_to_classes(data: Dataset, names: list[str] | None) -> Dataset:
    """The samples of the named classes, labelled in the order of `names` (match_classes),
    where all of `names` are the dataset's classes: a model trained on a subset of them
    (`train --classes`, the transfer recipe) calibrates on those. Unchanged otherwise, where
    the images only have to look like the model's (int8 calibration needs no labels)."""
    if not names or not set(names) <= set(data.classes) or len(set(names)) != len(names):
        return data
    return match_classes(data, names)


def materialize(ds: ArrayDataset | ImageFolder, workers: int = 2,
                classes: list[str] | None = None) -> ArrayDataset:
    """An in-memory uint8 copy; image folders are decoded by DataLoader workers. classes:
    the class names to label by (a training split's, for its test split), matched by name
    (see match_classes): a class the folder has and `classes` lacks is a UserError."""
    if classes:
        ds = match_classes(ds, classes, dataset=_name(ds), theirs="the training split",
                           subset=False)
    if isinstance(ds, ArrayDataset):
        return ds
    own = list(ds.classes)
    loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0))
    xs, ys = zip(*loader) if len(ds) else ((), ())
    if not xs:
        raise UserError(f"{_name(ds)} holds no images")
    return ArrayDataset(torch.cat(xs), torch.cat(ys), own)


def _name(ds: Dataset) -> str:
    root = getattr(ds, "root", None) or getattr(getattr(ds, "folder", None), "root", None)
    return str(root) if root else "the dataset"


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
    if classes:  # by name, as materialize does
        ds = match_classes(ds, classes, dataset=_name(ds), theirs="the training split",
                           subset=False)
    if isinstance(ds, ArrayDataset):
        return ds
    shape = (ds.in_chans, ds.image_size, ds.image_size)
    if cache is True or (cache == "auto" and fits_in_memory(len(ds), shape)):
        return materialize(ds, workers)
    return StreamedFolder(ds, workers)
