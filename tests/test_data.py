"""Readers, lookup and batched transforms, on real Fashion-MNIST and on files made here."""
import gzip
import pickle
import struct
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from resnetkit.data import ImageFolder, load_dataset, load_image, read_idx
from resnetkit.data import lookup
from resnetkit.data import transforms as T
from resnetkit.data.readers import ArrayDataset, cifar_dataset
from resnetkit.errors import UserError


def write_idx(path, arr, gz=True):
    """IDX as specified by LeCun's MNIST page: 0, 0, type code, ndim, big-endian dims, data."""
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    head = bytes([0, 0, codes[arr.dtype.type], arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    data = head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path, gz):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x", a, gz)
    assert np.array_equal(read_idx(tmp_path / "x"), a)
    b = np.array([1, -5, 70000], dtype=np.int32)
    write_idx(tmp_path / "y", b, gz)
    assert np.array_equal(read_idx(tmp_path / "y"), b)


def test_truncated_and_bad_idx(tmp_path):
    a = np.zeros((10, 28, 28), np.uint8)
    write_idx(tmp_path / "x", a, gz=False)
    raw = (tmp_path / "x").read_bytes()
    (tmp_path / "t").write_bytes(raw[:-100])
    with pytest.raises(UserError, match="truncated"):
        read_idx(tmp_path / "t")
    (tmp_path / "g").write_bytes(gzip.compress(raw)[:-30])
    with pytest.raises(UserError, match="damaged or truncated"):
        read_idx(tmp_path / "g")
    (tmp_path / "m").write_bytes(b"PK\x03\x04" + raw)
    with pytest.raises(UserError, match="bad magic"):
        read_idx(tmp_path / "m")
    with pytest.raises(UserError, match="missing dataset file"):
        read_idx(tmp_path / "nope")


def test_fashion_mnist_is_built_in():
    # REFERENCE.md section 4: 60,000 + 10,000 images, 28x28 grayscale, 10 classes.
    tr, te = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    assert tr.images.shape == (60_000, 1, 28, 28) and te.images.shape == (10_000, 1, 28, 28)
    assert tr.images.dtype == torch.uint8 and len(tr.classes) == 10
    assert torch.equal(torch.bincount(tr.labels), torch.full((10,), 6_000))


def test_fashion_lookup_order_env_and_offline_message(tmp_path, monkeypatch):
    real = lookup.find_fashion_mnist()
    monkeypatch.setenv("RESNETKIT_DATA", str(real))
    assert lookup.find_fashion_mnist() == real
    monkeypatch.delenv("RESNETKIT_DATA")
    monkeypatch.setattr(lookup, "DEBIAN_DIR", tmp_path / "none")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def offline(*a, **k):
        raise urllib.error.URLError("network unreachable")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match=r"looked in .*none.*cache.*download failed.*apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "train")
    with pytest.raises(UserError, match="does not hold the four Fashion-MNIST files"):
        lookup.find_fashion_mnist(tmp_path)


def test_fashion_checksum_mismatch(tmp_path):
    for name in lookup.FASHION_FILES:
        a = np.zeros((3, 28, 28) if "images" in name else (3,), np.uint8)
        write_idx(tmp_path / name, a)
    with pytest.raises(UserError, match="checksum"):
        load_dataset(f"fashion-mnist:{tmp_path}", "train")


def test_label_out_of_range():
    with pytest.raises(UserError, match="label 10 is out of range for 10 classes"):
        ArrayDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 10]),
                     [str(i) for i in range(10)])


def fake_cifar(root, n=20):
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))}
        (root / name).write_bytes(pickle.dumps(d))
    (root / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))


def test_cifar_reader(tmp_path):
    fake_cifar(tmp_path / "c")
    tr, te = cifar_dataset(tmp_path / "c", "train"), cifar_dataset(tmp_path / "c", "test")
    assert tr.images.shape == (100, 3, 32, 32) and te.images.shape == (20, 3, 32, 32)
    raw = pickle.loads((tmp_path / "c" / "test_batch").read_bytes())["data"][0]
    assert torch.equal(te.images[0, 0].flatten(), torch.from_numpy(raw[:1024]))  # R plane first


def test_cifar_refuses_arbitrary_pickles(tmp_path):
    fake_cifar(tmp_path / "c")

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))
    (tmp_path / "c" / "test_batch").write_bytes(pickle.dumps({"data": Evil()}))
    with pytest.raises(UserError, match="refusing to load builtins.print"):
        cifar_dataset(tmp_path / "c", "test")


def make_folder(root):
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(root / "cat" / "a.png")
    Image.new("L", (30, 40), 128).save(root / "cat" / "b.jpg")
    Image.new("RGBA", (32, 32), (0, 0, 255, 10)).save(root / "dog" / "c.png")
    p = Image.new("P", (32, 32))
    p.putpalette([0, 255, 0] * 256)
    p.save(root / "dog" / "d.png")
    Image.fromarray(np.full((32, 32), 65535, np.uint16)).save(root / "dog" / "e.png")
    (root / "dog" / "broken.png").write_bytes(b"not an image at all")


def test_image_folder_modes_and_bad_files(tmp_path):
    make_folder(tmp_path)
    with pytest.warns(UserWarning, match="broken.png"):
        ds = ImageFolder(tmp_path, 24, in_chans=3)
    assert len(ds) == 5 and ds.classes == ["cat", "dog"]
    x = {p.name: ds[i][0] for i, (p, _) in enumerate(ds.samples)}
    assert all(t.shape == (3, 24, 24) and t.dtype == torch.uint8 for t in x.values())
    assert x["a.png"][:, 12, 12].tolist() == [255, 0, 0]
    assert x["b.jpg"][:, 12, 12].tolist() == [128, 128, 128]
    assert x["c.png"][:, 12, 12].tolist() == [0, 0, 255]   # alpha dropped
    assert x["d.png"][:, 12, 12].tolist() == [0, 255, 0]   # palette resolved
    assert x["e.png"][:, 12, 12].tolist() == [255, 255, 255]  # 16-bit: top 8 bits
    gray = ImageFolder(tmp_path, 24, in_chans=1, on_bad="skip")
    assert gray[0][0].shape == (1, 24, 24) and gray[0][0][0, 0, 0] == 76  # luma of pure red
    with pytest.raises(UserError, match="not decodable images: .*broken.png"):
        ImageFolder(tmp_path, 24, on_bad="error")


def test_empty_class_folder(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty has no readable images"):
        ImageFolder(tmp_path, 24, on_bad="skip")


def test_load_image_errors(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(UserError, match="cannot decode"):
        load_image(tmp_path / "x.png", 28, 1)


def test_pad_random_crop_matches_manual_crop():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, 9, 7)
    out = T.pad_random_crop(x, 3, g)
    g = torch.Generator().manual_seed(1)
    oy, ox = torch.randint(0, 7, (6,), generator=g), torch.randint(0, 7, (6,), generator=g)
    xp = torch.nn.functional.pad(x, (3, 3, 3, 3))
    for i in range(6):
        assert torch.equal(out[i], xp[i, :, oy[i]:oy[i] + 9, ox[i]:ox[i] + 7])


def test_flip_erase_rrc_and_eval_resize():
    x = torch.rand(64, 1, 8, 8)
    g = torch.Generator().manual_seed(0)
    f = T.hflip(x, g)
    flipped = [torch.equal(f[i], x[i].flip(-1)) for i in range(64)]
    assert all(torch.equal(f[i], x[i]) for i in range(64) if not flipped[i]) and 10 < sum(flipped) < 54
    assert torch.equal(T.random_erasing(x, g, p=0.0), x)
    e = T.random_erasing(x, g, p=1.0)
    assert all((e[i] != x[i]).any() for i in range(64))
    full = T.random_resized_crop(x, 8, g, scale=(1, 1), ratio=(1, 1))
    assert torch.allclose(full, x, atol=1e-5)
    assert T.resize_center_crop(torch.rand(2, 3, 40, 60), 32).shape == (2, 3, 32, 32)
    a = T.random_resized_crop(x, 6, torch.Generator().manual_seed(5))
    b = T.random_resized_crop(x, 6, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (64, 1, 6, 6)


def never_blocks(fn, *args, seconds=20):
    """fn(*args), failing the test (not hanging it) if it blocks on a FIFO."""
    import signal

    def stuck(*_):
        raise AssertionError(f"{fn.__name__} blocked reading a FIFO")
    old = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(seconds)
    try:
        return fn(*args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_a_fifo_is_refused_never_read(tmp_path):
    import os
    make_folder(tmp_path / "f")
    os.mkfifo(tmp_path / "f" / "dog" / "x.png")
    (tmp_path / "f" / "dog" / "nested.png").mkdir()  # a folder named like an image: left out
    with pytest.raises(UserError, match=r"x\.png is a FIFO, not a regular image file"):
        never_blocks(ImageFolder, tmp_path / "f", 24)
    with pytest.raises(UserError, match="is a FIFO"):
        never_blocks(load_image, tmp_path / "f" / "dog" / "x.png", 24, 1)
    with pytest.raises(UserError, match="is a folder"):
        load_image(tmp_path / "f" / "dog" / "nested.png", 24, 1)
    os.mkfifo(tmp_path / "train-images-idx3-ubyte.gz")
    with pytest.raises(UserError, match="is a FIFO, not a regular dataset file"):
        never_blocks(read_idx, tmp_path / "train-images-idx3-ubyte.gz")
    for name in lookup.FASHION_FILES:  # fashion-mnist's checksum reads them too
        if not (tmp_path / name).exists():
            (tmp_path / name).write_bytes(b"")
    with pytest.raises(UserError, match="is a FIFO"):
        never_blocks(load_dataset, f"fashion-mnist:{tmp_path}", "train")
    # a folder named for the dataset that does not hold it is not swapped for another one
    with pytest.raises(UserError, match="does not hold the four Fashion-MNIST files"):
        load_dataset(f"fashion-mnist:{tmp_path / 'f'}", "train")
