"""The GPU-throughput options of MERLitModule, run on the CPU: channels-last (2D and 3D weights)
and torch.compile change the speed, not the outputs; a compiled model's checkpoint keys are the
plain model's."""

import torch

from famnet_pl.models.module import MERLitModule


def _module(**options) -> MERLitModule:
    torch.manual_seed(0)
    return MERLitModule(model="famnet_r18", net={"width_2d": 4, "width_3d": 4, "small_input_2d": True},
                        num_classes=3, num_aus=0, **options).eval()


def test_channels_last_keeps_the_outputs():
    x2d, x3d = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 4, 24, 24)
    plain, fast = _module(), _module(channels_last=True)
    convs = [p for p in fast.net.parameters() if p.dim() in (4, 5)]
    assert any(p.dim() == 5 for p in convs)
    assert all(p.is_contiguous(memory_format=torch.channels_last if p.dim() == 4 else torch.channels_last_3d)
               for p in convs)
    with torch.no_grad():
        torch.testing.assert_close(fast(x2d, x3d)["emotion"], plain(x2d, x3d)["emotion"],
                                   atol=1e-5, rtol=1e-5)


def test_compile_runs_on_the_cpu_and_keeps_the_checkpoint_keys():
    from famnet_pl.models.components.ststnet import STSTNet  # the smallest network: a short compile

    torch.manual_seed(0)
    plain = MERLitModule(model="ststnet", num_classes=3, net={"dropout": 0.0}).eval()
    compiled = MERLitModule(model="ststnet", num_classes=3, net={"dropout": 0.0}, compile=True).eval()
    compiled.load_state_dict(plain.state_dict())
    assert compiled.state_dict().keys() == plain.state_dict().keys() and isinstance(compiled.net, STSTNet)
    x = torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x)["emotion"], plain(x)["emotion"], atol=1e-5, rtol=1e-5)
