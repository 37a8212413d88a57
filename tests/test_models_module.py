"""MERLitModule and its former name FAMNetLitModule: the alias constructs, parses and loads old
checkpoints (plain and LightningCLI-saved ones)."""

from __future__ import annotations

import importlib

import lightning as L
import pytest
import torch

from famnet_pl.losses import LossWeights
from famnet_pl.models.module import FAMNetLitModule, MERLitModule

NET = {"width_2d": 4, "small_input_2d": True}


def test_alias_is_the_same_class_and_constructs():
    assert FAMNetLitModule is MERLitModule
    # What jsonargparse does with `class_path: famnet_pl.models.module.FAMNetLitModule` in an old config.
    module_name, _, name = "famnet_pl.models.module.FAMNetLitModule".rpartition(".")
    cls = getattr(importlib.import_module(module_name), name)
    assert cls is MERLitModule
    module = cls(model="amnet2d_r18", num_classes=3, net=NET)
    assert isinstance(module, MERLitModule)
    assert module(torch.randn(2, 3, 32, 32))["emotion"].shape == (2, 3)


def _checkpoint(module: MERLitModule, path, cli: bool) -> None:
    """A checkpoint as Lightning writes one: with ``cli``, the hparams as LightningCLI saves them (the
    config, dataclasses as dicts, re-instantiated through jsonargparse on load)."""
    hparams = dict(module.hparams)
    if cli:
        hparams["loss_weights"] = vars(hparams["loss_weights"]).copy()
        hparams["_instantiator"] = "lightning.pytorch.cli.instantiate_module"
    torch.save({"pytorch-lightning_version": L.__version__, "state_dict": module.state_dict(),
                "hparams_name": "kwargs", "hyper_parameters": hparams}, path)


@pytest.mark.parametrize("cli", [False, True], ids=["plain", "lightning_cli"])
@pytest.mark.parametrize("cls", [FAMNetLitModule, MERLitModule], ids=["old_name", "new_name"])
def test_checkpoints_load_through_either_name(tmp_path, cls, cli):
    torch.manual_seed(0)
    module = FAMNetLitModule(model="amnet2d_r18", num_classes=3, num_aus=2, net=NET,
                             loss_weights=LossWeights(w3d=0.0, wfuse=0.0, wau=0.3))
    _checkpoint(module, tmp_path / "old.ckpt", cli)
    loaded = cls.load_from_checkpoint(tmp_path / "old.ckpt", map_location="cpu", weights_only=False)
    assert type(loaded) is MERLitModule
    assert loaded.criterion.weights == LossWeights(w3d=0.0, wfuse=0.0, wau=0.3)
    for key, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_frl_dgt_checkpoint_with_a_moved_loss_weight_stops_and_loads_with_the_new_key(tmp_path):
    """A checkpoint saved before the DGM weights moved to loss_weights (net.flow_weight) stops with
    the new key; passing the net without it and the weight in loss_weights loads it."""
    net = {"dgm_width": 4, "dgm_levels": 2, "embed_dim": 16, "heads": 2}
    module = MERLitModule(model="frl_dgt", num_classes=3, in_channels_2d=6, net=net,
                          loss_weights=LossWeights(dgm_flow=0.0))
    _checkpoint(module, tmp_path / "frl.ckpt", cli=True)
    ckpt = torch.load(tmp_path / "frl.ckpt", weights_only=False)
    ckpt["hyper_parameters"]["net"] = {**net, "flow_weight": 0.0}
    ckpt["hyper_parameters"]["loss_weights"] = {"w2d": 1.0, "w3d": 1.0, "wfuse": 1.0, "wau": 0.5}
    torch.save(ckpt, tmp_path / "frl.ckpt")
    with pytest.raises(ValueError, match=r"net\.flow_weight moved to model\.loss_weights\.dgm_flow"):
        FAMNetLitModule.load_from_checkpoint(tmp_path / "frl.ckpt", weights_only=False)
    loaded = FAMNetLitModule.load_from_checkpoint(tmp_path / "frl.ckpt", weights_only=False, net=net,
                                                  loss_weights={"dgm_flow": 0.0})
    assert loaded.criterion.weights.dgm_flow == 0.0
    assert loaded.net.active_aux_losses == ("dgm_photo", "dgm_smooth")


def test_flip_tta_averages_the_emotion_distributions_of_both_views():
    """With mirrored views in the batch (data.tta=hflip) every emotion output is the log of the mean
    of the two softmaxes, the fused one included; without them the outputs are the network's own."""
    torch.manual_seed(0)
    module = MERLitModule(model="famnet_r18", num_classes=3, net={**NET, "width_3d": 4}).eval()
    x2d, x3d = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 4, 16, 16)
    batch = {"x2d": x2d, "x3d": x3d, "index": torch.arange(2)}
    plain, mirrored = module(x2d, x3d), module(x2d.flip(-1), x3d.flip(-1))
    assert torch.equal(module.predict_step(batch)["probs"], torch.softmax(plain["emotion"], 1))
    out = module._outputs({**batch, "x2d_flip": x2d.flip(-1), "x3d_flip": x3d.flip(-1)})
    for key in ("emotion", "emotion_2d", "emotion_3d", "emotion_fused"):
        mean = (torch.softmax(plain[key], 1) + torch.softmax(mirrored[key], 1)) / 2
        torch.testing.assert_close(out[key].exp(), mean)
    torch.testing.assert_close(out["au_2d"], plain["au_2d"])
