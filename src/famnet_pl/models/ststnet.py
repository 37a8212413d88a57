"""Registry entry for the comparison model STSTNet.

* ``ststnet``: :class:`~famnet_pl.models.components.ststnet.STSTNet` (Liong et al., FG 2019), the
  MEGC 2019 baseline, on the flow view (``data.input_2d=flow``: u, v, strain).

Data flow::

    model.net options (YAML / --model.net.*) -> ststnet(num_classes, num_aus, in_channels_2d, **options)
        -> check (3-channel flow view) -> STSTNet

It takes the keyword arguments the LightningModule passes to every model (``num_classes``,
``num_aus``, ``in_channels_2d``) plus its own options, checks that the data's 2D view is the flow
view, and returns ``emotion`` / ``emotion_2d`` (and ``au_2d`` with ``au_head=True``).
"""

from __future__ import annotations

from typing import Any

from famnet_pl.models.components.ststnet import STSTNet
from famnet_pl.models.registry import register_model


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
