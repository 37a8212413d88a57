"""Registry entry for the comparison model FRL-DGT.

* ``frl_dgt``: :class:`~famnet_pl.models.components.frl_dgt.FRLDGT` (Zhai et al., CVPR 2023,
  arXiv 2304.04420) on the onset/apex pair view (``data.input_2d=pair``, 6 channels) or the pair plus
  optical flow (``pair_flow``, 9 channels, which also enables the DGM's flow guidance).

Data flow::

    model.net options (YAML / --model.net.*) -> frl_dgt(num_classes, num_aus, in_channels_2d, **options)
        -> checks (2D view, options that moved to model.loss_weights) -> FRLDGT

It takes the keyword arguments the LightningModule passes to every model (``num_classes``,
``num_aus``, ``in_channels_2d``) plus its own options, checks that the data's 2D view is one it can
read, and returns ``emotion`` / ``emotion_2d`` (and ``au_2d`` with ``au_head=True``), plus the
unweighted self-supervised ``aux_losses`` that ``model.loss_weights.dgm_*`` weigh (losses.py).
"""

from __future__ import annotations

from typing import Any

from famnet_pl.models.components.frl_dgt import FRLDGT
from famnet_pl.models.registry import ModelOptionError, register_model

#: Former ``model.net`` options that are loss weights now (``model.loss_weights``, losses.py), so a
#: sweep over ``model.loss_weights.*`` reaches them: old name -> new field.
MOVED_TO_LOSS_WEIGHTS: dict[str, str] = {
    "dgm_photo_weight": "dgm_photo",
    "dgm_smooth_weight": "dgm_smooth",
    "flow_weight": "dgm_flow",
}


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
        ModelOptionError: (a ValueError) if an option is one of :data:`MOVED_TO_LOSS_WEIGHTS` (an
            old config): one line naming the new key.
    """
    moved = [old for old in MOVED_TO_LOSS_WEIGHTS if old in options]
    if moved:
        # An old config must stop, not train with the default weight in silence.
        raise ModelOptionError("; ".join(
            f"net.{old} moved to model.loss_weights.{MOVED_TO_LOSS_WEIGHTS[old]} "
            f"(--model.loss_weights.{MOVED_TO_LOSS_WEIGHTS[old]}={options[old]})" for old in moved))
    if in_channels_2d not in (6, 9):
        raise ValueError("frl_dgt needs onset and apex frames (data.input_2d=pair or pair_flow); "
                         f"got a {in_channels_2d}-channel 2D view")
    return FRLDGT(num_classes=num_classes, num_aus=num_aus, in_channels=in_channels_2d, **options)
