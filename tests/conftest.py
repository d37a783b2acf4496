import os

import pytest
import torch
from filelock import FileLock

torch.manual_seed(0)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two test processes share the cores: each computes on one thread, and so do the
    # processes tests start (servers, torchrun ranks, CLI runs), which would otherwise spin
    # two OpenMP threads each against the other test process.
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """--dist loadgroup (pyproject): a test marked xdist_group("G") gets "@G" at the end of
    its node id, which is how pytest-xdist's scheduler keeps a group in one process.
    pytest-xdist 3.8 sets the id in an attribute pytest 9 no longer reads (`_nodeid`; pytest 9
    keeps `_id`), so its groups would be dealt out like any test: set it where pytest reads it."""
    if not getattr(config.option, "loadgroup", False):
        return
    from _pytest.nodeid import NodeId
    for item in items:
        names = {str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                 for m in item.iter_markers("xdist_group")}
        if names and "@" not in item.nodeid:
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(sorted(names))}")
    # the groups first: the scheduler hands out work in this order, and a long group dealt
    # last would leave the other process idle at the end
    items.sort(key=lambda item: "@" not in item.nodeid)


# The one tiny training config of the suite (a ResNet-20 of widths 4, 8, 8 on 512 real
# Fashion-MNIST images: 4 steps of 128 an epoch, fp32, deterministic); tests add or change
# what they need through the `tiny_config` fixture.
TINY = dict(model="resnet20", model_overrides={"widths": (4, 8, 8), "stem_width": 4},
            train_subset=512, test_subset=200, batch_size=128, epochs=3, lr=0.1,
            schedule="cosine", precision="fp32", deterministic=True, plots=False)


@pytest.fixture
def tiny_config(tmp_path):
    """build_config(TINY + overrides), its run folder tmp_path/NAME: tiny_config("run", epochs=1)."""
    from resnetkit.train import build_config

    def make(name: str = "run", **overrides):
        return build_config(None, **{**TINY, **overrides}, out_dir=str(tmp_path), name=name)
    return make


def shared_folder(tmp_path_factory) -> "os.PathLike":
    """A folder every process of this test session sees: pytest's base temporary folder,
    or, under pytest-xdist, the one above the workers' own."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A small ResNet-20 trained for 2 epochs on 4,096 Fashion-MNIST images (~70% top-1),
    trained once per session: the first process to need it trains it, under a file lock,
    and the others (pytest-xdist workers) wait for it and read it."""
    from resnetkit.train import Trainer, build_config
    root = shared_folder(tmp_path_factory)
    out = root / "trained-runs"
    with FileLock(str(root / "trained-runs.lock")):
        if not (out / "r" / "results.json").exists():
            cfg = build_config(None, model="resnet20", train_subset=4096, test_subset=500,
                               epochs=2, batch_size=128, lr=0.1, precision="fp32", plots=False,
                               out_dir=str(out), name="r")
            Trainer(cfg, quiet=True).fit()
    return out / "r"


def with_bn_stats(m, seed=0):
    """`m` in eval mode with non-trivial BN statistics and affine parameters (a freshly built
    net has mean 0, var 1, weight 1, bias 0, which hides mistakes in folding and in maps)."""
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            n = mod.num_features
            mod.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            mod.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return m.eval()


