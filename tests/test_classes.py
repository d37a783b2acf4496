"""A dataset's classes meet a model's by name, on every engine: a test class the model does
not know is refused, a different order or a subset of the classes is scored by name."""
import numpy as np
import pytest
import torch
from PIL import Image

import resnetkit as rk
from resnetkit.cli import main
from resnetkit.data import ArrayDataset, ImageFolder, StreamedFolder, match_classes
from resnetkit.data import in_memory_or_streamed, load_dataset, load_image
from resnetkit.errors import UserError
from resnetkit.evaluate import evaluate_checkpoint, preprocess
from resnetkit.infer import evaluate_source
from resnetkit.weights import checkpoint as ckpt

PRE = {"mean": [0.5], "std": [0.25], "image_size": 16, "in_chans": 1}


@pytest.fixture(autouse=True)
def own_rng():
    """The global RNG as it was before each test (loading a checkpoint draws from it), so
    that the tests after these see what they saw without them."""
    with torch.random.fork_rng():
        yield


def tiny(classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    m = rk.create_model("resnet20", widths=(4, 8, 8), stem_width=4, in_chans=1,
                        num_classes=classes).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a head whose answers depend on the image
        m.fc.weight.copy_(torch.randn(m.fc.weight.shape, generator=g) * 3)
    return m


def save(path, model, names):
    ckpt.save_weights(path, model, {"classes": names, "preprocess": PRE})
    return path


def folder(root, counts: dict[str, int], seed=0):
    """root/CLASS/i.png, random 16x16 gray images: counts[CLASS] of each."""
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(
                root / name / f"{i}.png")
    return root


def by_hand(model, root, names):
    """The confusion matrix computed independently: each file through the model, its true
    class the index of its folder's name among the model's classes."""
    conf = torch.zeros(len(names), len(names), dtype=torch.long)
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(d.iterdir()):
            x = preprocess(load_image(f, 16, 1)[None], PRE["mean"], PRE["std"])
            with torch.no_grad():
                conf[names.index(d.name), int(model(x).argmax(1))] += 1
    return conf.tolist()


def test_a_test_class_the_model_does_not_know_is_named(tmp_path, capsys):
    m = tiny(2)
    w = save(tmp_path / "w.safetensors", m, ["a", "b"])
    test = folder(tmp_path / "test", {"b": 2, "c": 3})
    with pytest.raises(UserError, match="has class c, which the model does not know"):
        evaluate_checkpoint(w, f"folder:{test}")
    with pytest.raises(UserError, match="has class c"):
        evaluate_source(w, f"folder:{test}", engine="onnxruntime", precision="fp32")
    assert main(["eval", str(w), "--dataset", f"folder:{test}"]) == 2
    err = capsys.readouterr().err
    assert "class c" in err and "Traceback" not in err and err.count("\n") == 1
    # training reads its test split the same way: by name, against the training split
    train = ImageFolder(folder(tmp_path / "train", {"a": 2, "b": 2}), 16, 1)
    with pytest.raises(UserError, match="has class c, which the training split"):
        in_memory_or_streamed(ImageFolder(test, 16, 1), True, 0, train.classes)


@pytest.mark.parametrize("names,counts,onnx", [
    (["b", "a"], {"a": 3, "b": 5}, True),          # the same classes, in another order
    (["a", "b", "c"], {"b": 4, "c": 2}, False),    # the test set has some of the model's
])
def test_classes_are_scored_by_name(tmp_path, names, counts, onnx):
    m = tiny(len(names))
    w = save(tmp_path / "w.safetensors", m, names)
    test = folder(tmp_path / "test", counts)
    want = by_hand(m, test, names)
    r = evaluate_checkpoint(w, f"folder:{test}")
    assert r["confusion"] == want and list(r["per_class"]) == names
    assert r["samples"] == sum(counts.values()) and "classes_left_out" not in r
    if onnx:  # every engine is judged on the same data (one export is enough here)
        e = evaluate_source(w, f"folder:{test}", engine="onnxruntime", precision="fp32")
        assert e["confusion"] == want and e["engine"] == "onnxruntime"


def test_match_classes_cases():
    x = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 1, 2, 2).clone()
    data = ArrayDataset(x, torch.tensor([0, 1, 2, 0, 1, 2]), ["a", "b", "c"])
    r = match_classes(data, ["c", "a", "b"])
    assert r.classes == ["c", "a", "b"] and r.labels.tolist() == [1, 2, 0, 1, 2, 0]
    r = match_classes(data, ["c", "a"])  # a model of some of the classes: those samples
    assert r.labels.tolist() == [1, 0, 1, 0] and r.images[:, 0, 0, 0].tolist() == [0, 2, 3, 5]
    with pytest.raises(UserError, match="has class c, which the model does not know"):
        match_classes(data, ["a", "b", "z"])
    with pytest.raises(UserError, match="has class c.*the training split"):
        match_classes(data, ["a", "b"], subset=False, theirs="the training split")
    with pytest.raises(UserError, match="more than once"):
        match_classes(data, ["a", "a", "b"])
    # an IDX folder's classes are only numbers: its order, with the counts checked
    idx = ArrayDataset(x, torch.tensor([0, 1, 2, 0, 1, 2]), ["0", "1", "2"])
    assert match_classes(idx, ["x", "y", "z"]) is idx
    with pytest.raises(UserError, match="has 3 classes, the model 2"):
        match_classes(idx, ["x", "y"])
    with pytest.raises(UserError, match="has 3 classes, the model 4"):
        match_classes(data, None, 4)


def test_a_streamed_folder_is_relabelled_by_name(tmp_path):
    root = folder(tmp_path / "f", {"a": 1, "b": 2})
    streamed = StreamedFolder(ImageFolder(root, 16, 1), workers=0)
    r = match_classes(streamed, ["b", "a"])
    assert r.classes == ["b", "a"]
    assert [(p.parent.name, label) for p, label in r.samples] == [("a", 1), ("b", 0), ("b", 0)]
    assert r.labels.tolist() == [1, 0, 0]


def test_a_model_of_some_classes_is_judged_by_name_on_every_engine(tmp_path):
    # `train --classes 8,0,7` writes these names: plain eval and int8 on ONNX Runtime
    # (calibrated on those classes) read the same 3,000 test images, in the model's order
    names = ["Bag", "T-shirt/top", "Sneaker"]
    m = tiny(3)
    pre = {"mean": [0.29], "std": [0.35], "image_size": 28, "in_chans": 1}
    ckpt.save_weights(tmp_path / "w.safetensors", m, {"classes": names, "preprocess": pre})
    w = tmp_path / "w.safetensors"
    raw = load_dataset("fashion-mnist", "test")
    keep = (raw.labels == 8) | (raw.labels == 0) | (raw.labels == 7)
    x = preprocess(raw.images[keep], pre["mean"], pre["std"])
    with torch.no_grad():
        pred = m(x).argmax(1)
    truth = torch.tensor([names.index(raw.classes[c]) for c in raw.labels[keep].tolist()])
    top1 = (pred == truth).float().mean().item()
    plain = evaluate_checkpoint(w)
    assert plain["samples"] == 3000 and plain["top1"] == pytest.approx(top1)
    assert plain["classes_left_out"] == [c for c in raw.classes if c not in names]
    int8 = evaluate_source(w, engine="onnxruntime", precision="int8",
                              calibration="fashion-mnist:64")
    assert int8["samples"] == 3000 and list(int8["per_class"]) == names
    assert int8["precision"] == "int8" and int8["top1"] == pytest.approx(top1, abs=0.05)
