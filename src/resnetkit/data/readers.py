"""Dataset readers: IDX (MNIST family), CIFAR python batches, image-folder trees.

Small datasets are held in memory as uint8 tensors (N, C, H, W); image folders are decoded
with Pillow in DataLoader workers, once into memory or, when too large, on every pass
(StreamedFolder). Both offer the trainer the same interface: len, labels, classes, shape,
mean/std, subset() and batches()."""
from __future__ import annotations

import gzip
import pickle
import stat
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import UserError
from ..untrusted import path_component, regular_file, shown

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def byte_histogram(images: torch.Tensor) -> torch.Tensor:
    """(C, 256) counts of each byte value per channel of uint8 images (N, C, H, W)."""
    return torch.stack([torch.bincount(images[:, c].reshape(-1), minlength=256)
                        for c in range(images.shape[1])])


def channel_stats(images: torch.Tensor | None = None, hist: torch.Tensor | None = None
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (unbiased) std of uint8 images scaled to [0, 1], computed exactly
    from a histogram of the byte values (of `images`, or a summed `hist` from
    byte_histogram): the same on every machine and thread count."""
    mean, std = [], []
    v = torch.arange(256, dtype=torch.float64)
    hist = byte_histogram(images) if hist is None else hist
    for c in range(hist.shape[0]):
        h = hist[c].double()
        n = h.sum()
        m = (h * v).sum() / n
        var = (h * (v - m) ** 2).sum() / max(n - 1, 1)
        mean.append(float(m / 255))
        std.append(float(var.sqrt() / 255))
    return tuple(mean), tuple(std)


@dataclass
class ArrayDataset:
    """Images (N, C, H, W) uint8 and labels (N,) int64, all in memory."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise UserError(f"{len(self.images)} images but {len(self.labels)} labels")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            bad = int(self.labels.max() if self.labels.max() >= len(self.classes) else self.labels.min())
            raise UserError(f"label {bad} is out of range for {len(self.classes)} classes")
        if not self.mean:  # the dataset's own statistics, for normalisation
            self.mean, self.std = channel_stats(self.images)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, ...]:
        """(C, H, W) of every image."""
        return tuple(self.images.shape[1:])

    def subset(self, keep: torch.Tensor) -> "ArrayDataset":
        """The samples at `keep`, normalised with the statistics of the whole set."""
        return ArrayDataset(self.images[keep], self.labels[keep], self.classes, self.mean,
                            self.std)

    def batches(self, index_lists: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The uint8 images of each index list, in order."""
        return (self.images[idx] for idx in index_lists)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzip or plain), checking its header against its length."""
    path = Path(path)
    if path.exists():
        regular_file(path, "dataset file")  # a FIFO or device would never end
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise UserError(f"missing dataset file {path}") from None
    except (OSError, EOFError) as e:
        raise UserError(f"{path} is damaged or truncated ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise UserError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    expected = 4 + 4 * ndim + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise UserError(f"{path} is truncated or padded: header promises {expected} bytes, "
                        f"file has {len(raw)}")
    return np.frombuffer(raw, dtype, offset=4 + 4 * ndim).reshape(dims)


def idx_dataset(images: Path, labels: Path, classes: list[str]) -> ArrayDataset:
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1:
        raise UserError(f"{images} must hold (N, H, W) images and {labels} (N,) labels")
    return ArrayDataset(torch.from_numpy(x.copy()).unsqueeze(1),
                        torch.from_numpy(y.astype(np.int64)), classes)


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles; allow only what they contain (dicts, bytes,
    lists, numpy arrays), never arbitrary objects."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _cifar_batch(path: Path) -> dict:
    if path.exists():
        regular_file(path, "CIFAR file")
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise UserError(f"missing CIFAR file {path}") from None
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise UserError(f"{path} is not a CIFAR python batch ({e})") from None


def cifar_dataset(root: str | Path, split: str) -> ArrayDataset:
    """CIFAR-10 (data_batch_1..5, test_batch, batches.meta) or CIFAR-100 (train, test, meta)."""
    root = Path(root)
    if (root / "batches.meta").exists():
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta, key, names = "batches.meta", "labels", "label_names"
    elif (root / "meta").exists():
        files, meta, key, names = [split], "meta", "fine_labels", "fine_label_names"
    else:
        raise UserError(f"{root} holds no CIFAR-10 (batches.meta) or CIFAR-100 (meta) files; "
                        f"unpack the 'python version' archive there")
    batches = [_cifar_batch(root / f) for f in files]
    x = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
    y = np.concatenate([np.asarray(b[key], dtype=np.int64) for b in batches])
    if x.ndim != 2 or x.shape[1] != 3072:
        raise UserError(f"{root}: CIFAR rows must be 3072 bytes (3x32x32), got {x.shape}")
    classes = list(_cifar_batch(root / meta)[names])
    return ArrayDataset(torch.from_numpy(x.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(y),
                        classes)


def to_array(img: Image.Image, in_chans: int) -> np.ndarray:
    """Decode to uint8 (H, W, C) predictably: 16-bit keeps its top 8 bits, palette and
    alpha images are converted through RGBA and the alpha dropped, grayscale is replicated
    for 3 channels and colour turned to luma (ITU-R 601) for 1."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.uint32)
        shift = 8 if img.mode.startswith("I;16") or arr.max() > 255 else 0
        img = Image.fromarray((arr >> shift).clip(0, 255).astype(np.uint8), "L")
    elif img.mode == "P":
        img = img.convert("RGBA")
    img = img.convert("L" if in_chans == 1 else "RGB")
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def resize_center(img: Image.Image, size: int, resize: int = 0,
                  interpolation: str = "bilinear") -> Image.Image:
    """Resize the shorter side to `resize` (default `size`), then crop the centre
    size x size: torchvision's Resize + CenterCrop on PIL images (the longer side truncated,
    the crop offset rounded), which timm's eval transform also uses with resize =
    floor(size / crop_pct)."""
    resize = resize or size
    if interpolation not in _RESAMPLE:
        raise UserError(f"interpolation must be one of {', '.join(_RESAMPLE)}, got {interpolation!r}")
    w, h = img.size
    if w <= h:
        new = (resize, int(resize * h / w))
    else:
        new = (int(resize * w / h), resize)
    if new != (w, h):
        img = img.resize(new, _RESAMPLE[interpolation])
    w, h = img.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def load_image(path: str | Path, size: int, in_chans: int, resize: int = 0,
               interpolation: str = "bilinear") -> torch.Tensor:
    """One image file as a (C, size, size) uint8 tensor (see resize_center). Raises
    UserError if it is not a regular file (a FIFO named x.png would block for ever) or is
    undecodable."""
    regular_file(path, "image file")
    try:
        with Image.open(path) as img:
            img.load()
            img = resize_center(img, size, resize, interpolation) if size else img
            arr = to_array(img, in_chans)
    except FileNotFoundError:
        raise UserError(f"no such image file {shown(path)}") from None
    except Image.DecompressionBombError as e:  # Pillow's limit on pixels, against bombs
        raise UserError(f"{shown(path)} is too large to decode safely ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"cannot decode {shown(path)} as an image ({shown(e)})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def folder_files(folder: Path) -> list[Path]:
    """The files directly inside `folder`, sorted; nested folders and links that lead nowhere
    are left out, and anything else that is not a regular file (a FIFO, a device, a socket:
    reading one would block or never end) is a UserError naming it."""
    files = []
    for p in sorted(folder.iterdir()):
        try:
            mode = p.stat().st_mode
        except OSError:
            continue  # a dangling link
        if not stat.S_ISDIR(mode):
            files.append(regular_file(p, "image file"))
    return files


class ImageFolder(torch.utils.data.Dataset):
    """root/CLASS/IMAGE files; every file is checked at start-up, so a bad file is reported
    once, up front (skipped with a warning, or an error with on_bad="error"). An entry that
    is not a regular file (a FIFO, a device) is an error, never read."""

    def __init__(self, root: str | Path, image_size: int, in_chans: int = 3,
                 on_bad: str = "skip", classes: list[str] | None = None, resize: int = 0,
                 interpolation: str = "bilinear"):
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"image folder {shown(root)} does not exist")
        self.root = root
        dirs = sorted(d.name for d in root.iterdir() if d.is_dir())
        self.classes = [path_component(c, "class name") for c in classes] if classes else dirs
        if not self.classes:
            raise UserError(f"{shown(root)} has no class folders (expected root/CLASS/image.png)")
        self.samples: list[tuple[Path, int]] = []
        bad: list[str] = []
        for i, c in enumerate(self.classes):
            files = folder_files(root / c) if (root / c).is_dir() else []
            good = 0
            for p in files:
                try:
                    with Image.open(p) as img:
                        img.verify()
                    self.samples.append((p, i))
                    good += 1
                except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
                        Image.DecompressionBombError):
                    bad.append(str(p))
            if good == 0:
                raise UserError(f"class folder {shown(root / c)} has no readable images")
        if bad:
            if on_bad == "error":
                raise UserError(f"{len(bad)} file(s) in {shown(root)} are not decodable images: "
                                + ", ".join(map(shown, bad[:10])))
            warnings.warn(f"skipping {len(bad)} undecodable file(s): "
                          f"{', '.join(map(shown, bad[:10]))}"
                          + (" ..." if len(bad) > 10 else ""), stacklevel=2)
        self.skipped = bad
        self.image_size, self.in_chans = image_size, in_chans
        # the eval transform: shorter side to `resize` (default image_size), centre crop
        self.resize, self.interpolation = resize, interpolation

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return load_image(path, self.image_size, self.in_chans, self.resize,
                          self.interpolation), label


class _FolderImages(torch.utils.data.Dataset):
    """Index -> decoded uint8 image of a list of (path, label) samples (for DataLoaders)."""

    def __init__(self, samples: list[tuple[Path, int]], image_size: int, in_chans: int):
        self.samples, self.image_size, self.in_chans = samples, image_size, in_chans

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> torch.Tensor:
        return load_image(self.samples[i][0], self.image_size, self.in_chans)


class StreamedFolder:
    """An image folder decoded from disk on every pass by `workers` DataLoader processes,
    for folders whose decoded images would not fit in memory. The mean/std are exact (a
    histogram over one pass, made when first needed)."""

    def __init__(self, folder: ImageFolder, workers: int = 2,
                 classes: list[str] | None = None,
                 samples: list[tuple[Path, int]] | None = None,
                 stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None):
        self.folder, self.workers = folder, workers
        self.samples = list(folder.samples if samples is None else samples)
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.long)
        self.classes = list(classes or folder.classes)
        if stats is not None:
            self.__dict__["_stats"] = stats

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.folder.in_chans, self.folder.image_size, self.folder.image_size)

    @cached_property
    def _stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        chunks = torch.arange(len(self)).split(256)
        hist = sum(byte_histogram(x) for x in self.batches(chunks))
        return channel_stats(hist=hist)

    @property
    def mean(self) -> tuple[float, ...]:
        return self._stats[0]

    @property
    def std(self) -> tuple[float, ...]:
        return self._stats[1]

    def subset(self, keep: torch.Tensor) -> "StreamedFolder":
        """The samples at `keep`, normalised with the statistics of the whole folder."""
        return StreamedFolder(self.folder, self.workers, self.classes,
                              [self.samples[i] for i in keep.tolist()], self._stats)

    def batches(self, index_lists: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The uint8 images of each index list, in order, decoded ahead by the workers."""
        if not len(index_lists):
            return iter(())
        ds = _FolderImages(self.samples, self.folder.image_size, self.folder.in_chans)
        # Its own generator: starting the workers must not draw from the global RNG (that
        # would change, e.g., the initial weights against an in-memory run).
        loader = torch.utils.data.DataLoader(
            ds, batch_sampler=[idx.tolist() for idx in index_lists], collate_fn=torch.stack,
            num_workers=self.workers, prefetch_factor=4 if self.workers else None,
            generator=torch.Generator().manual_seed(0))
        return iter(loader)
