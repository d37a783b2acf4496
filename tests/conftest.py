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
