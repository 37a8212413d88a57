"""GPU tier (`make test-gpu`): AMP and full-size branches on CUDA. Skipped where no GPU exists."""

import pytest
import torch

from famnet_pl.config import build_cli
from famnet_pl.models.registry import create_model
from tests.conftest import REPO, tiny_args

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_full_size_famnet_bf16_forward_backward():
    net = create_model("famnet_r18", num_classes=5, num_aus=8, in_channels_2d=3).cuda()
    x2d = torch.randn(8, 3, 112, 112, device="cuda")
    x3d = torch.randn(4, 3, 16, 112, 112, device="cuda").repeat(2, 1, 1, 1, 1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = net(x2d=x2d, x3d=x3d)
        loss = out["emotion"].float().logsumexp(1).mean() + out["au_2d"].float().mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_gpu_config_fits_with_bf16_mixed(tiny_synth, tmp_path):
    args = ["--config", str(REPO / "experiments/base.yaml"),
            "--config", str(REPO / "experiments/model/famnet.yaml"),
            *tiny_args(tiny_synth, tmp_path / "cache"), "--trainer.accelerator=gpu", "--trainer.devices=1",
            "--trainer.precision=bf16-mixed", "--model.net.width_2d=64", "--model.net.width_3d=64",
            "--trainer.max_epochs=2", f"--trainer.default_root_dir={tmp_path}"]
    cli = build_cli(args)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.state.finished and cli.trainer.strategy.root_device.type == "cuda"


@pytest.mark.parametrize("size, patch", [(112, 8), (224, 16)])
def test_frl_dgt_bf16_forward_backward_at_face_sizes(size, patch):
    net = create_model("frl_dgt", num_classes=5, num_aus=8, in_channels_2d=9, au_head=True, patch_size=patch,
                       embed_dim=128).cuda()
    x2d = torch.randn(16, 9, size, size, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = net(x2d=x2d)
        loss = out["emotion"].float().logsumexp(1).mean() + sum(out["aux_losses"].values())
    loss.backward()
    assert torch.isfinite(loss) and out["displacement"].shape == (16, 2, size, size)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_ststnet_on_cuda():
    net = create_model("ststnet", num_classes=3, in_channels_2d=3).cuda()
    out = net(x2d=torch.randn(32, 3, 28, 28, device="cuda"))
    assert out["emotion"].shape == (32, 3)
