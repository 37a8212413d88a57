"""Every pending fold of a tiny model trained at once: ``famnet-pl loso --stack-folds``.

A tiny model's fold (STSTNet: 2.5 k parameters, ~280 optimiser steps) costs more in per-step
kernel launches and per-fold setup than in arithmetic. Here the K pending folds' copies of the
network are one stacked network (models/components/ststnet.py, StackedSTSTNet), trained in one
process on one shared tensor of the cached views, each copy on its own fold's training subjects
only: one forward, backward and optimiser step serve K folds.

Data flow::

    run_stacked(plan, pending)
        one CLI of the run's config: the seeded initial network (the one every sequential fold
            starts from), the optimiser and schedule options (models/module.optimiser), the DataModule
        per pending fold k: setup(fold k) -> its training / inner-validation / test rows and the
            normalisation statistics of its training rows (nothing of the test subject)
        the un-normalised 2D view of every sample -> one tensor on the device, shared by all folds
        per epoch, per fold: the sequential run's sampler and generator -> its order of its rows
            step s: fold k's s-th batch (padded to the batch size; the padding is masked)
                -> flip / shift (ClipAugment.draw_many, fold k's own stream) -> fold k's stats
                -> StackedSTSTNet (B, K, ...) -> each fold's mean cross-entropy, summed -> one step
                (a fold whose epoch has no batch left takes no step: its gradients are None)
        every eval_every epochs and the last: each fold's test subject and inner-validation rows
            -> prediction tables (callback.prediction_table; flip TTA as the DataModule's tta)
        the end, per fold: callback.write_fold_records, [--keep-models: its network unstacked into
            a model directory], predictions.csv last (the fold-done marker)

Training runs in float32 on the Trainer's device whatever ``trainer.precision`` says. Each fold's
result is its own: its copy never sees another fold's samples (the convolutions are
grouped, batch norm is per channel and averages over the copy's own real samples, the loss is a
sum of per-fold terms, Adam and weight decay are elementwise). What differs from the sequential
run is which batches and augmentation draws each fold gets, so the scores differ from it as
another seed's would (README: "How close the stacked folds are"). A run killed before the end
writes no fold; rerunning starts the pending folds again (there are no per-fold resume points).
"""

from __future__ import annotations

import copy
import math
import shutil
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import yaml
from torch.utils.data import RandomSampler
from tqdm.auto import tqdm

from famnet_pl.config import build_cli
from famnet_pl.data.transforms import ClipAugment, moved_index
from famnet_pl.data.views import flow_u_channels, raw_2d
from famnet_pl.deploy.bundle import write_bundle
from famnet_pl.loso.callback import prediction_table, write_fold_records
from famnet_pl.loso.plan import LosoPlan
from famnet_pl.loso.rundir import FAILED, FOLD_CONFIG, PREDICTIONS, TRAIN_LOG
from famnet_pl.models.components.ststnet import STREAMS, StackedSTSTNet, STSTNet
from famnet_pl.models.module import optimiser
from famnet_pl.utils.errors import BadInput
from famnet_pl.utils.io import atomic_write_bytes, atomic_write_csv, atomic_write_json, atomic_write_text

#: Folds trained together: on 2 CPU cores a training step costs about 3-5 ms per fold with 12 or 16
#: copies stacked, and about 6 ms with 23 or 35 (a step's activations outgrow the caches). A
#: fold's result does not depend on which folds share its stack (tests/test_loso_stacked.py).
STACK = 16


@dataclass
class _Fold:
    """One fold's rows and statistics (from the DataModule set up for it)."""

    k: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    mean: torch.Tensor
    std: torch.Tensor
    split: dict
    test_subject: str
    seed: int


def unsupported(cli) -> str | None:
    """Why this config cannot run stacked (one line), or None."""
    module, trainer = cli.model, cli.trainer
    hp = module.hparams
    if not isinstance(module.net, STSTNet):
        return f"model {hp.model} has no stacked form (STSTNet does: --model.model=ststnet)"
    if module.net.au is not None:
        return "net.au_head=true: the stacked network trains the emotion head only"
    if hp.get("balance", "none") != "none" or hp.get("label_smoothing", 0.0):
        return "model.balance / model.label_smoothing: the stacked network's loss is the plain cross-entropy"
    if cli.datamodule.hparams.input_2d != "flow":
        return ("the stacked folds augment flow views only (flip and shift); data.input_2d="
                f"{cli.datamodule.hparams.input_2d} would need brightness and contrast draws too")
    if getattr(trainer, "gradient_clip_val", None):
        return "trainer.gradient_clip_val clips the norm over all parameters, which would couple the folds"
    if trainer.accumulate_grad_batches != 1:
        return "trainer.accumulate_grad_batches must be 1"
    if trainer.world_size > 1:
        return "trainer.devices must be 1 (the folds share one device)"
    return None


def _folds(dm, pending: list[int]) -> list[_Fold]:
    folds = []
    for k in pending:
        dm.hparams.fold, dm._ready = k, False
        dm.setup("fit")
        stats = dm.train_set.stats
        folds.append(_Fold(k, dm.train_set.indices, dm.val_set.indices if dm.val_set is not None else
                           np.empty(0, np.int64), dm.test_set.indices,
                           torch.as_tensor(stats["mean_2d"]), torch.as_tensor(stats["std_2d"]),
                           dict(dm.split), dm.test_subject, dm._fold_seed))
    return folds


def _pad(rows: list[np.ndarray], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(size, K)`` row indices (padding repeats a fold's first row, or row 0) and the real-row mask."""
    index = torch.zeros(size, len(rows), dtype=torch.long)
    mask = torch.zeros(size, len(rows), dtype=torch.bool)
    for j, r in enumerate(rows):
        index[:len(r), j] = torch.as_tensor(r[:size])
        index[len(r):, j] = int(r[0]) if len(r) else 0
        mask[:len(r), j] = True
    return index, mask


class _Stack:
    """The stacked network with its data: batches, one training step, evaluation."""

    def __init__(self, cli, folds: list[_Fold], device: torch.device) -> None:
        dm, module = cli.datamodule, cli.model
        self.folds, self.device = folds, device
        self.flow_u = flow_u_channels(dm.hparams.input_2d, dm.hparams.clip_mode)["x2d"]
        self.augment = ClipAugment() if dm.hparams.augment else None
        # The un-normalised 2D view of every sample, once (views.raw_2d, as for one sample or a
        # batch), zero-padded by the largest shift a draw makes: a batch is then one gather.
        x = raw_2d(dm.prepare().arrays, dm.hparams.input_2d)
        self.side = x.shape[1:3]
        self.pad = math.ceil(self.augment.translate * max(self.side)) if self.augment is not None else 0
        self.x = torch.nn.functional.pad(x, (0, 0, *(self.pad,) * 4)).to(device)
        self.mean = torch.stack([f.mean for f in folds]).to(device)  # (K, C): fold k's training statistics
        self.std = torch.stack([f.std for f in folds]).to(device)
        self.labels = torch.tensor(dm.manifest["label"].to_numpy(), dtype=torch.long, device=device)
        self.net = StackedSTSTNet([copy.deepcopy(module.net) for _ in folds]).to(device)
        self.template = module.net
        self.rngs = [np.random.default_rng([f.seed, 1]) for f in folds]  # each fold's draw stream
        # and its dropout stream: a fold's training does not depend on the folds stacked beside it
        self.dropout = [torch.Generator(device).manual_seed(f.seed + 1) for f in folds]
        side = dm.hparams.image_size
        self.pooled = (side + 2 - 3) // 3 + 1  # the side after the streams' max pooling (3/3, pad 1)
        self.tta = dm.hparams.tta == "hflip"
        self.w2d = module.criterion.weights.w2d
        self.k = len(folds)

    def noise(self, batch: int) -> torch.Tensor:
        """``(B, h, w, K * 16)`` random bytes for the stacked dropout (channels last, as the pooled
        map), fold k's from its own stream."""
        shape = (batch, self.pooled, self.pooled, sum(STREAMS))
        return torch.stack([torch.randint(0, 256, shape, generator=g, device=self.device, dtype=torch.uint8)
                            for g in self.dropout], dim=3).flatten(3)

    def inputs(self, index: torch.Tensor, *, augment: bool, flip: bool = False) -> torch.Tensor:
        """``(B, K, C, H, W)`` normalised views of rows ``index`` ``(B, K)``, fold k's stats in [:, k]:
        a view of one ``(B, H, W, K, C)`` tensor, i.e. the channels-last ``(B, K * C, H, W)`` input
        of StackedSTSTNet without a copy. Training (``augment``) flips and shifts fold k's samples
        with its own draws; ``flip`` (evaluation only) mirrors every sample (flip test-time
        augmentation)."""
        if augment and flip:
            raise ValueError("flip is the evaluation's mirrored view; training flips by its own draws")
        b, k = index.shape
        (h, w), device = self.side, self.device
        if augment and self.augment is not None:
            draws = [self.augment.draw_many(rng, b, h, w) for rng in self.rngs]  # fold k's own stream
            flips, dx, dy = (torch.stack([d[name] for d in draws], 1).to(device)  # (B, K)
                             for name in ("flip", "dx", "dy"))
            flips, dx, dy = flips > 0, dx.long(), dy.long()
        else:
            flips = torch.full((b, k), flip, device=device)
            dx = dy = torch.zeros((b, k), dtype=torch.long, device=device)
        rows, cols = moved_index(flips.flatten(), dx.flatten(), dy.flatten(), h, w, self.pad)
        # (contiguous: the gather's output takes its layout from the index tensors')
        rows = rows.view(b, k, h).transpose(1, 2).contiguous()[:, :, None, :]  # (B, H, 1, K)
        cols = cols.view(b, k, w).transpose(1, 2).contiguous()[:, None, :, :]  # (B, 1, W, K)
        x = self.x[index.to(device)[:, None, None, :], rows, cols]  # (B, H, W, K, C)
        if self.flow_u is not None:  # a flip negates the horizontal flow
            x[..., self.flow_u] *= torch.where(flips, -1.0, 1.0)[:, None, None, :]
        return ((x - self.mean) / self.std).permute(0, 3, 4, 1, 2)

    def evaluate(self, which: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per fold ``(rows, probabilities)`` of its ``test`` or inner-``val`` rows."""
        rows = [getattr(f, which) for f in self.folds]
        size = max((len(r) for r in rows), default=0)
        if not size:
            return [(r, np.zeros((0, self.template.fc.out_features), np.float32)) for r in rows]
        index, _ = _pad(rows, size)
        self.net.eval()
        with torch.no_grad():
            probs = torch.softmax(self.net(self.inputs(index, augment=False)), -1)
            if self.tta:  # the mean of the two distributions, as MERLitModule._outputs
                mirrored = self.net(self.inputs(index, augment=False, flip=True))
                probs = 0.5 * (probs + torch.softmax(mirrored, -1))
        self.net.train()
        probs = probs.cpu().numpy()
        return [(r, probs[:len(r), j]) for j, r in enumerate(rows)]


def run_stacked(plan: LosoPlan, pending: list[int], *, progress: bool = False) -> list[int]:
    """Train folds ``pending`` of ``plan``, :data:`STACK` at a time, and write each fold's records;
    returns the folds that stopped on a non-finite loss (their ``failed.json`` says so)."""
    cli = build_cli([*plan.cli_args, f"--data.fold={pending[0]}", "--trainer.logger=false"])
    reason = unsupported(cli)
    if reason:
        raise BadInput(f"--stack-folds: {reason}; run without --stack-folds")
    failed: dict[int, str] = {}
    chunks = [pending[i:i + STACK] for i in range(0, len(pending), STACK)]
    bar = tqdm(total=len(chunks) * cli.trainer.max_epochs, desc=f"{len(pending)} folds, {STACK} at a time",
               unit="epoch", disable=not progress, dynamic_ncols=True)
    for chunk in chunks:
        folds = _folds(cli.datamodule, chunk)
        stack = _Stack(cli, folds, cli.trainer.strategy.root_device)
        records, losses = _train(cli, stack, plan.options.eval_every, failed, bar)
        _write(plan, cli, stack, records, losses, failed)  # a killed run keeps the chunks written
    bar.close()
    return sorted(failed)


def _train(cli, stack: _Stack, eval_every: int, failed: dict[int, str], bar) -> tuple[dict, dict]:
    """Train one stack; returns per fold its evaluations ``(test, val)`` as ``(epoch, rows, probs)``
    lists and its per-epoch training losses. A fold whose loss turns non-finite is added to
    ``failed`` and stops; the others go on."""
    dm, module, folds, device = cli.datamodule, cli.model, stack.folds, stack.device
    opt, schedule = optimiser(stack.net.parameters(), module.hparams, cli.trainer.max_epochs, foreach=True)
    epochs, batch = cli.trainer.max_epochs, dm.hparams.batch_size
    generators = [torch.Generator().manual_seed(f.seed) for f in folds]  # the sequential loaders' seeds
    alive = torch.ones(len(folds), dtype=torch.bool)
    records = {f.k: ([], []) for f in folds}
    losses = {f.k: [] for f in folds}
    for epoch in range(epochs):
        orders = []
        for f, g in zip(folds, generators):
            torch.empty((), dtype=torch.int64).random_(generator=g)  # a DataLoader iterator's base seed
            orders.append(f.train[list(RandomSampler(range(len(f.train)), generator=g))])
        steps = max(math.ceil(len(o) / batch) for o in orders)
        sums = torch.zeros(len(folds), dtype=torch.float64)
        for s in range(steps):
            chunk = [o[s * batch:(s + 1) * batch] for o in orders]
            index, mask = _pad(chunk, batch)
            mask &= alive[None]
            active = mask.any(0)
            logits = stack.net(stack.inputs(index, augment=True), mask.to(device), stack.noise(batch))
            labels = stack.labels[index.to(device)]
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                                   reduction="none").view(index.shape)
            m = mask.to(device, ce.dtype)
            per_fold = (ce * m).sum(0) / m.sum(0).clamp(min=1)  # each fold's mean over its real samples
            bad = active & ~torch.isfinite(per_fold.detach().cpu())
            for j in torch.nonzero(bad).flatten().tolist():  # that fold stops; the others go on
                failed[folds[j].k] = (f"fold {folds[j].k} ({folds[j].test_subject}): non-finite training "
                                      f"loss (NaN or inf) at epoch {epoch}; the fold is stopped and gets no "
                                      "predictions: lower the learning rate (--model.lr)")
                alive[j] = False
            active &= alive
            opt.zero_grad(set_to_none=True)
            (stack.w2d * torch.where(active.to(device), per_fold, 0.0)).sum().backward()
            for j in torch.nonzero(~active).flatten().tolist():  # no step at all for an idle fold: its
                for p in stack.net.copies[j].parameters():  # weights, moments and Adam's step count
                    p.grad = None  # stay as a sequential fold's (the optimiser skips None gradients)
            opt.step()
            sums += torch.where(active, per_fold.detach().cpu().double() * mask.sum(0), 0.0)
        for j, f in enumerate(folds):
            losses[f.k].append({"epoch": epoch, "train/loss": float(sums[j] / max(1, len(orders[j])))})
        if schedule is not None:
            schedule.step()
        last = epoch + 1 == epochs
        if last or (eval_every and (epoch + 1) % eval_every == 0):
            for which, slot in (("test", 0), ("val", 1)):
                if which == "val" and not any(len(f.val) for f in folds):
                    continue
                for f, (rows, probs) in zip(folds, stack.evaluate(which)):
                    records[f.k][slot].append((epoch, rows, probs))
        bar.update(1)
    return records, losses


def _write(plan: LosoPlan, cli, stack: _Stack, records: dict, losses: dict, failed: dict) -> None:
    """Each fold's files, as a sequential fold writes them (predictions.csv last)."""
    dm, options, folds = cli.datamodule, plan.options, stack.folds
    nets = stack.net.cpu().unstack() if options.keep_models else None
    config = yaml.safe_load(cli.parser.dump(cli.config))  # the run's; each fold's differs in data.fold
    for j, f in enumerate(folds):
        out = plan.fold_dir(f.k)
        shutil.rmtree(out, ignore_errors=True)  # what a killed earlier attempt left
        out.mkdir(parents=True)
        if f.k in failed:
            atomic_write_json(out / FAILED, {"fold": f.k, "subject": f.test_subject, "error": failed[f.k]})
            continue
        # what the tables and records read of the fold (the AU targets are every row's, in any split)
        dm.test_subject, dm.split = f.test_subject, f.split
        # no AU head: the AU probabilities are absent (NaN), as a sequential STSTNet fold writes them
        tables = [[prediction_table(dm, dm.train_set, f.k, epoch, probs, np.zeros((len(rows), 0)), rows)
                   for epoch, rows, probs in records[f.k][slot]] for slot in (0, 1)]
        atomic_write_csv(out / TRAIN_LOG, pd.DataFrame(losses[f.k]))
        data = config["data"].get("init_args", config["data"])  # subclass mode or a plain MERDataModule
        data["fold"] = f.k
        atomic_write_text(out / FOLD_CONFIG, yaml.safe_dump(config, sort_keys=False))
        predictions = write_fold_records(out, dm, f.k, tables[0], tables[1], config_hash=plan.config_hash)
        if nets is not None:  # the model directory needs the fold's own statistics: set it up
            dm.hparams.fold, dm._ready = f.k, False
            dm.setup("fit")
            module = copy.deepcopy(cli.model).cpu()
            module.net = nets[j]
            write_bundle(out, module, dm)
        atomic_write_bytes(out / PREDICTIONS, predictions)
