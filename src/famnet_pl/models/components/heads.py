"""Multi-task output head: emotion classification + multi-label AU detection.

Data flow::

    pooled features (B, F) -> dropout -> { Linear -> emotion logits (B, num_classes)
                                          { Linear -> AU logits      (B, num_aus)

Design source: FAMNet (arXiv 2508.13483) trains micro-expression recognition
jointly with facial action unit detection using hard parameter sharing: the
whole backbone is shared and only these two linear layers are task-specific.
AU logits are independent per AU (use ``BCEWithLogitsLoss``), emotion logits
are mutually exclusive (use ``CrossEntropyLoss``).
"""

from __future__ import annotations

from torch import Tensor, nn


class MultiTaskHead(nn.Module):
    """Two linear heads on one shared feature vector.

    Args:
        in_features: Size of the pooled feature vector.
        num_classes: Number of emotion classes.
        num_aus: Number of action units; 0 disables the AU head (its output
            is then an empty (B, 0) tensor so callers need no special case).
        dropout: Dropout probability applied to the features before both heads.
    """

    def __init__(self, in_features: int, num_classes: int, num_aus: int, dropout: float = 0.0) -> None:
        super().__init__()
        if num_classes < 1 or num_aus < 0:
            raise ValueError(f"need num_classes >= 1 and num_aus >= 0, got {num_classes}, {num_aus}")
        self.num_aus = num_aus
        self.dropout = nn.Dropout(dropout)
        self.emotion = nn.Linear(in_features, num_classes)
        # No zero-sized Linear: its init warns and it would hold no parameters anyway.
        self.au = nn.Linear(in_features, num_aus) if num_aus > 0 else None

    def forward(self, feat: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(emotion_logits (B, num_classes), au_logits (B, num_aus))``."""
        feat = self.dropout(feat)
        emotion = self.emotion(feat)
        au = self.au(feat) if self.au is not None else feat.new_zeros((feat.shape[0], 0))
        return emotion, au
