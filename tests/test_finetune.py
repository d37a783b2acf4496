"""Fine-tuning: frozen BatchNorm, frozen parts, a faster head, class subsets, and starting a
run from another run's weights."""
import pytest
import torch

import resnetkit as rk
from conftest import TINY
from resnetkit.errors import UserError
from resnetkit.train import Trainer, build_config
from resnetkit.train.finetune import FrozenBatchNorm2d, freeze, freeze_batchnorm

# conftest's tiny network, in batches of 50 (data and schedule are each test's)
SMALL = dict({k: TINY[k] for k in ("model", "model_overrides", "precision", "plots")}, batch_size=50)


def test_frozen_batchnorm_is_eval_mode_batchnorm_and_never_changes():
    bn = torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
    frozen = FrozenBatchNorm2d.from_bn(bn)
    x = torch.randn(4, 6, 5, 5)
    assert torch.allclose(frozen.train()(x), bn.eval()(x), atol=1e-6)
    assert list(frozen.parameters()) == [] and set(frozen.state_dict()) == set(bn.state_dict())
    m = rk.create_model("resnet18")
    assert freeze_batchnorm(m) == sum(1 for _ in rk.create_model("resnet18").modules()
                                      if isinstance(_, torch.nn.BatchNorm2d))
    rk.ResNet(m.cfg).load_state_dict(m.state_dict())  # checkpoints stay plain-BN compatible


def test_frozen_parts_do_not_learn_and_the_head_learns_faster(tmp_path):
    t = Trainer(build_config(None, **SMALL, epochs=1, train_subset=200, test_subset=100,
                             freeze=["stem", "layer1"], head_lr_mult=10, out_dir=str(tmp_path),
                             name="f"), quiet=True)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.fit()
    after = t.model.state_dict()
    for k in before:
        if k.startswith(("conv1.", "layer1.")) and not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["layer2.0.conv1.weight"], after["layer2.0.conv1.weight"])
    lrs = {id(p): g["initial_lr"] for g in t.optimizer.param_groups for p in g["params"]}
    assert lrs[id(t.model.fc.weight)] == pytest.approx(10 * lrs[id(t.model.layer3[0].conv1.weight)])
    assert id(t.model.conv1.weight) not in lrs
    with pytest.raises(UserError, match="cannot freeze layer4"):
        freeze(rk.create_model("resnet20"), ["layer4"])


def test_class_subset_and_per_class(tmp_path):
    t = Trainer(build_config(None, **SMALL, epochs=1, classes=[7, 2], per_class=30,
                             out_dir=str(tmp_path), name="s"), quiet=True)
    assert t.train_data.classes == ["Sneaker", "Pullover"] and len(t.train_data) == 60
    assert torch.bincount(t.train_data.labels).tolist() == [30, 30]
    assert len(t.test_data) == 2000 and set(t.test_data.labels.tolist()) == {0, 1}
    assert t.model.fc.out_features == 2
    with pytest.raises(UserError, match="distinct indices below 10"):
        Trainer(build_config(None, **SMALL, classes=[3, 10], out_dir=str(tmp_path), name="x"))


def test_init_from_a_run_keeps_the_backbone_and_starts_a_new_head(tmp_path):
    pre = Trainer(build_config(None, **SMALL, epochs=1, classes=[0, 1, 2], train_subset=300,
                               test_subset=100, out_dir=str(tmp_path), name="pre"), quiet=True)
    pre.fit()
    with pytest.warns(UserWarning, match="head starts fresh"):
        ft = Trainer(build_config(None, **{**SMALL, "batch_size": 20}, epochs=1, classes=[5, 6],
                                  per_class=20, init=str(tmp_path / "pre"),
                                  out_dir=str(tmp_path), name="ft"),
                     quiet=True)
    src = rk.create_model("resnet20", widths=(4, 8, 8), stem_width=4, in_chans=1, num_classes=3,
                          checkpoint_path=tmp_path / "pre" / "best.safetensors")
    assert torch.equal(ft.model.layer3[2].conv2.weight, src.layer3[2].conv2.weight)
    assert ft.model.fc.out_features == 2
    assert ft.mean == pytest.approx(pre.mean)  # the initial weights' own normalisation


@pytest.mark.slow
def test_transfer_recipe_beats_training_from_scratch(tmp_path):
    """The full transfer recipe (about 4 minutes on 2 cores): pretraining on classes 0-4
    helps on 500 images of classes 5-9. Run with `pytest -m slow`."""
    pre = Trainer(build_config("fashion-mnist-0to4", out_dir=str(tmp_path), plots=False), quiet=True)
    pre.fit()
    ft = Trainer(build_config("fashion-mnist-transfer", init=str(tmp_path / "fashion-mnist-0to4"),
                              out_dir=str(tmp_path), name="ft", plots=False), quiet=True).fit()
    scratch = Trainer(build_config("fashion-mnist-transfer", init="", head_lr_mult=1.0,
                                   out_dir=str(tmp_path), name="scratch", plots=False),
                      quiet=True).fit()
    assert ft["test"]["samples"] == 5000
    assert ft["test"]["top1"] > scratch["test"]["top1"]


def test_a_head_for_other_classes_of_the_same_number_starts_fresh(tmp_path):
    """Classes 0-2 then 3-5: three outputs each, but the head's rows mean other classes, so it
    starts fresh (warned); the same classes again keep it."""
    import warnings
    pre = Trainer(build_config(None, **SMALL, epochs=1, classes=[0, 1, 2], train_subset=300,
                               test_subset=60, out_dir=str(tmp_path), name="pre"), quiet=True)
    pre.fit()
    src = rk.create_model("resnet20", widths=(4, 8, 8), stem_width=4, in_chans=1, num_classes=3,
                          checkpoint_path=tmp_path / "pre" / "best.safetensors")
    with pytest.warns(UserWarning, match=r"answers other classes \(T-shirt/top, Trouser, "
                                         r"Pullover\); the head starts fresh"):
        other = Trainer(build_config(None, **SMALL, epochs=1, classes=[3, 4, 5], per_class=20,
                                     init=str(tmp_path / "pre"), out_dir=str(tmp_path),
                                     name="other"), quiet=True)
    assert torch.equal(other.model.layer3[2].conv2.weight, src.layer3[2].conv2.weight)
    assert not torch.equal(other.model.fc.weight, src.fc.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the head fits and means the same
        same = Trainer(build_config(None, **SMALL, epochs=1, classes=[0, 1, 2], per_class=20,
                                    init=str(tmp_path / "pre"), out_dir=str(tmp_path),
                                    name="same"), quiet=True)
    assert torch.equal(same.model.fc.weight, src.fc.weight)
