"""StackedSTSTNet: K STSTNets as one network give each copy's own outputs, gradients and
batch-norm statistics, and a copy's padding samples change nothing."""

import torch

from famnet_pl.models.components.ststnet import StackedSTSTNet, STSTNet


def _nets(k: int, dropout: float = 0.0) -> list[STSTNet]:
    nets = []
    for j in range(k):
        torch.manual_seed(j)
        nets.append(STSTNet(num_classes=3, dropout=dropout))
    return nets


def test_stacked_copies_compute_what_each_network_computes():
    nets, x = _nets(3), torch.randn(5, 3, 3, 28, 28)
    stacked = StackedSTSTNet(nets)
    out = stacked(x)
    assert out.shape == (5, 3, 3)
    out.square().sum().backward()
    for j, net in enumerate(nets):
        own = net(x2d=x[:, j])["emotion"]
        torch.testing.assert_close(out[:, j], own, atol=1e-5, rtol=1e-5)
        own.square().sum().backward()
        rows = slice(16 * j + 3, 16 * j + 8)  # copy j's second stream (5 filters after the first's 3)
        torch.testing.assert_close(stacked.conv_w.grad[rows], net.streams[1][0].weight.grad,
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(stacked.fc_w.grad[j], net.fc.weight.grad, atol=1e-4, rtol=1e-4)
    for j, back in enumerate(stacked.unstack()):  # running statistics and weights come back per copy
        torch.testing.assert_close(back.streams[2][2].running_mean, nets[j].streams[2][2].running_mean)
        back.eval(), nets[j].eval()
        torch.testing.assert_close(back(x2d=x[:, j])["emotion"], nets[j](x2d=x[:, j])["emotion"])
    stacked.eval()
    torch.testing.assert_close(stacked(x)[:, 1], nets[1](x2d=x[:, 1])["emotion"], atol=1e-5, rtol=1e-5)


def test_padding_samples_change_no_copy():
    nets, x = _nets(2), torch.randn(6, 2, 3, 28, 28)
    mask = torch.ones(6, 2, dtype=torch.bool)
    mask[4:, 1] = False  # copy 1 has 4 real samples in this step
    stacked = StackedSTSTNet(nets)
    out = stacked(x, mask)
    torch.testing.assert_close(out[:4, 1], nets[1](x2d=x[:4, 1])["emotion"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stacked.bn_mean[16:19], nets[1].streams[0][2].running_mean)
    before = stacked.bn_var.clone()
    stacked(x, torch.zeros(6, 2, dtype=torch.bool))  # a step without samples: statistics stay
    torch.testing.assert_close(stacked.bn_var, before)
