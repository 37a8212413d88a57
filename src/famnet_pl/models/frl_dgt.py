"""Registry entries for the comparison models FRL-DGT and STSTNet.

* ``frl_dgt``: :class:`~famnet_pl.models.components.frl_dgt.FRLDGT` (Zhai et al., CVPR 2023,
  arXiv 2304.04420) on the onset/apex pair view (``data.input_2d=pair``, 6 channels) or the pair plus
  optical flow (``pair_flow``, 9 channels, which also enables the DGM's flow guidance).
* ``ststnet``: :class:`~famnet_pl.models.components.ststnet.STSTNet` (Liong et al., FG 2019), the
  MEGC 2019 baseline, on the flow view (``data.input_2d=flow``: u, v, strain).

Both take the keyword arguments the LightningModule passes to every model (``num_classes``,
``num_aus``, ``in_channels_2d``) plus their own options, check that the data's 2D view is one they
can read, and return ``emotion`` / ``emotion_2d`` (and ``au_2d`` with ``au_head=True``).
"""

from __future__ import annotations

from typing import Any

from famnet_pl.models.components.frl_dgt import FRLDGT
from famnet_pl.models.components.ststnet import STSTNet
from famnet_pl.models.registry import register_model


@register_model("frl_dgt")
def frl_dgt(*, num_classes: int, num_aus: int = 0, in_channels_2d: int = 6, **options: Any) -> FRLDGT:
    """FRL-DGT on onset + apex frames (6 channels) or onset + apex + flow (9 channels).

    Args:
        num_classes: Number of emotion classes.
        num_aus: Number of AUs in the data (used only with ``au_head=True``).
        in_channels_2d: Channels of the data's 2D view; must be 6 or 9.
        **options: :class:`FRLDGT` options (``embed_dim``, ``dgm_mode``, ``dgm_weights``, ...).

    Raises:
        ValueError: If ``in_channels_2d`` is not 6 or 9.
    """
    if in_channels_2d not in (6, 9):
        raise ValueError("frl_dgt needs onset and apex frames (data.input_2d=pair or pair_flow); "
                         f"got a {in_channels_2d}-channel 2D view")
    return FRLDGT(num_classes=num_classes, num_aus=num_aus, in_channels=in_channels_2d, **options)


@register_model("ststnet")
def ststnet(*, num_classes: int, num_aus: int = 0, in_channels_2d: int = 3, **options: Any) -> STSTNet:
    """STSTNet on the 3-channel optical-flow view (u, v, strain).

    Args:
        num_classes: Number of emotion classes.
        num_aus: Number of AUs in the data (used only with ``au_head=True``).
        in_channels_2d: Channels of the data's 2D view; must be 3.
        **options: :class:`STSTNet` options (``au_head``, ``batch_norm``, ``dropout``).

    Raises:
        ValueError: If ``in_channels_2d`` is not 3.
    """
    if in_channels_2d != 3:
        raise ValueError("ststnet takes the flow view (u, v, strain): set data.input_2d=flow; "
                         f"got a {in_channels_2d}-channel 2D view")
    return STSTNet(num_classes=num_classes, num_aus=num_aus, in_channels=in_channels_2d, **options)
