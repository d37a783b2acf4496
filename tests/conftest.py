import pytest
import torch

torch.manual_seed(0)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A small ResNet-20 trained for 2 epochs on 4,096 Fashion-MNIST images (~70% top-1)."""
    from resnetkit.train import Trainer, build_config
    out = tmp_path_factory.mktemp("runs")
    cfg = build_config(None, model="resnet20", train_subset=4096, test_subset=500, epochs=2,
                       batch_size=128, lr=0.1, precision="fp32", plots=False, out_dir=str(out),
                       name="r")
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

