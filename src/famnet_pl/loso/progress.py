"""EpochProgress: one compact bar per fold (an update per epoch, with the training loss), shown
under the runner's bar over folds. Lightning's per-batch bar is switched off in experiments/base.yaml:
hundreds of short per-batch bars would bury the fold-level view.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback
from tqdm.auto import tqdm


class EpochProgress(Callback):
    """Progress over epochs of one fit.

    Args:
        desc: bar label.
        position: tqdm line (the fold bar is line 0).
    """

    def __init__(self, desc: str = "epochs", position: int = 1) -> None:
        super().__init__()
        self.desc, self.position, self.bar = desc, position, None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.bar = tqdm(total=trainer.max_epochs, desc=self.desc, position=self.position,
                        leave=False, dynamic_ncols=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loss = trainer.callback_metrics.get("train/loss_epoch")
        if self.bar is not None:
            if loss is not None:
                self.bar.set_postfix(loss=f"{float(loss):.3f}")
            self.bar.update(1)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
