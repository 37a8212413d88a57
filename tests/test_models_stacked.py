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
        own_weights = stacked.copies[j]  # copy j's second stream: 5 filters after the first's 3
        torch.testing.assert_close(own_weights.conv_w.grad[3:8], net.streams[1][0].weight.grad,
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(own_weights.fc_w.grad, net.fc.weight.grad, atol=1e-4, rtol=1e-4)
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


def test_an_idle_copy_takes_no_optimiser_step():
    """A copy whose fold has no batch left in a step (its gradients None, as loso/stacked.py sets
    them) ends where a sequential run of its own steps ends: weights, AdamW moments and AdamW's
    step count (its bias correction) untouched by the steps the other copies take."""
    import copy

    import torch.nn.functional as F

    nets = _nets(2)
    alone = copy.deepcopy(nets[1])
    stacked = StackedSTSTNet(nets)
    opt = torch.optim.AdamW(stacked.parameters(), lr=0.01)
    opt_alone = torch.optim.AdamW(alone.parameters(), lr=0.01)
    torch.manual_seed(0)
    for on in (True, False, False, True):  # copy 1 idle in the middle two steps; copy 0 always trains
        x, y = torch.randn(4, 2, 3, 28, 28), torch.randint(0, 3, (4, 2))
        mask = torch.ones(4, 2, dtype=torch.bool)
        mask[:, 1] = on
        ce = F.cross_entropy(stacked(x, mask).flatten(0, 1), y.flatten(), reduction="none").view(4, 2)
        opt.zero_grad(set_to_none=True)
        (ce.mean(0) * torch.tensor([1.0, float(on)])).sum().backward()
        if not on:
            for p in stacked.copies[1].parameters():
                p.grad = None
        opt.step()
        if on:
            opt_alone.zero_grad()
            F.cross_entropy(alone(x2d=x[:, 1])["emotion"], y[:, 1]).backward()
            opt_alone.step()
    back, expected = stacked.unstack()[1].state_dict(), alone.state_dict()
    for name, value in expected.items():
        if not name.endswith("num_batches_tracked"):  # (the stacked batch norm counts no batches)
            torch.testing.assert_close(back[name], value, atol=1e-5, rtol=1e-4, msg=name)
