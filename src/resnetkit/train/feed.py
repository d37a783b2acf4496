"""What the training loop is fed: the run's data splits, its normalisation, and the
augmentation of each training batch, whose random draws depend only on a seed."""
from __future__ import annotations

import torch

from ..data import (ArrayDataset, StreamedFolder, in_memory_or_streamed, load_dataset,
                    select_classes)
from ..data import transforms as T
from ..errors import UserError
from .config import TrainConfig

Dataset = ArrayDataset | StreamedFolder


def _subset(data: Dataset, n: int, seed: int) -> Dataset:
    """A fixed random subset of n samples (all when n is 0 or too large)."""
    if not n or n >= len(data):
        return data
    return data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n])


def load_data(cfg: TrainConfig) -> tuple[Dataset, Dataset]:
    """The training and test splits, subset as asked. Image folders too large to hold
    decoded are streamed from disk (cache_images)."""
    train = load_dataset(cfg.dataset, "train", cfg.data_dir, cfg.image_size,
                         in_chans=cfg.model_overrides.get("in_chans", 3), on_bad=cfg.on_bad_image)
    train = in_memory_or_streamed(train, cfg.cache_images, cfg.workers)
    test = in_memory_or_streamed(
        load_dataset(cfg.dataset, "test", cfg.data_dir, cfg.image_size, train.shape[0],
                     on_bad=cfg.on_bad_image),
        cfg.cache_images, cfg.workers, train.classes)
    train = select_classes(train, cfg.classes, cfg.per_class, cfg.seed)
    test = select_classes(test, cfg.classes)
    return _subset(train, cfg.train_subset, cfg.seed), _subset(test, cfg.test_subset, cfg.seed)


def draw_seed(seed: int, epoch: int, step: int, slot: int) -> int:
    """The seed of one micro-batch's random draws: a function of the run's seed, the
    position (epoch, step) and the micro-batch's slot in the global step (rank x accum +
    micro), so a resumed run of any world size draws what the uninterrupted one did."""
    return ((seed * 100_003 + epoch) * 1_000_003 + step) * 4099 + slot


class Feed:
    """A run's data: `train` and `test` splits, the normalisation `mean` and `std` (the
    data's own, or the initial weights' when a run starts from them), the `image_size`
    the network sees, and the augmentation TrainConfig asks for."""

    def __init__(self, cfg: TrainConfig):
        """Load the splits of cfg.dataset. Raises UserError for a dataset of one class."""
        self.cfg = cfg
        self.train, self.test = load_data(cfg)
        if len(self.train.classes) < 2:
            raise UserError(f"dataset {cfg.dataset} has {len(self.train.classes)} class; a "
                            f"classifier needs at least 2")
        self.mean, self.std = self.train.mean, self.train.std
        self.image_size = cfg.image_size or self.train.shape[-1]
        self.gen = torch.Generator()
        self._flip_start: torch.Tensor | None = None

    def flips(self, idx: torch.Tensor, epoch: int) -> torch.Tensor:
        """alternate_flip: whether each training sample of `idx` is mirrored in `epoch`. Each
        sample starts mirrored or not at random (a function of the seed) and alternates
        every epoch, so over two epochs every image is seen both ways (airbench's alternating
        flip: about as good as random flips with fewer epochs)."""
        if self._flip_start is None:
            g = torch.Generator().manual_seed(self.cfg.seed * 7919 + 17)
            self._flip_start = torch.rand(len(self.train), generator=g) < 0.5
        return self._flip_start[idx] ^ bool(epoch % 2)

    def augment(self, x: torch.Tensor, seed: int, idx: torch.Tensor | None = None,
                epoch: int = 0) -> torch.Tensor:
        """Augment a uint8 batch (training samples `idx`, in `epoch`) into a normalised
        float batch; the random draws depend only on `seed` (and alternating flips on idx
        and epoch), so a run is reproducible (and resumable mid-epoch) without carrying
        generator state."""
        c, g = self.cfg, self.gen.manual_seed(seed)
        x = x.float() / 255
        if c.random_resized_crop:
            x = T.random_resized_crop(x, self.image_size, g)
        elif x.shape[-1] != self.image_size:
            x = T.resize_center_crop(x, self.image_size)
        if c.crop_padding:
            x = T.pad_random_crop(x, c.crop_padding, g)
        if c.hflip and c.alternate_flip and idx is not None:
            x = T.flip_where(x, self.flips(idx, epoch))
        elif c.hflip:
            x = T.hflip(x, g)
        x = T.normalize(x, self.mean, self.std)
        if c.random_erasing:
            x = T.random_erasing(x, g, c.random_erasing)
        return x
