"""The data path alone (no model) at full size, from the preprocessing cache: training batches of the
synthetic set with the full-size views (x2d 3x112x112 flow + strain, x3d 16 RGB frames of 112 px,
batch 32, augmentation on), with 0 and 2 DataLoader workers. Samples/s over ten epochs after one
warm-up epoch (each epoch's first batch included). This is the CPU side a GPU waits for: the
augmentation draws and targets (in the workers, with workers) and the gather of the cached arrays
(one np.take per array, in the main process: datamodule.MERLoader); conversion, augmentation and
normalisation run on the batch's device afterwards (views.BatchViews). Prints figures; asserts
nothing.
"""

from __future__ import annotations

import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FULL = dict(protocol="synth_4cls", data_root=str(REPO / "data" / "synth"), input_2d="flow",
            clip_mode="frames", image_size=112, clip_len=16, clip_size=112, flow_algorithm="farneback",
            flow_size=128, batch_size=32, cache_dir=str(REPO / ".cache" / "famnet_pl"))


def samples_per_second(workers: int, epochs: int = 10) -> float:
    from famnet_pl.data.datamodule import SynthDataModule

    dm = SynthDataModule(**FULL, num_workers=workers)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    for _ in loader:  # warm-up: worker start, page cache
        pass
    start, n = time.perf_counter(), 0
    for _ in range(epochs):
        for batch in loader:
            n += len(batch["label"])
    return n / (time.perf_counter() - start)


def main() -> None:
    rates = {w: samples_per_second(w) for w in (0, 2)}
    print(f"loader alone, full size (x2d 3x112x112, x3d 3x16x112x112, batch 32, augmented), from the cache: "
          f"{rates[0]:.0f} samples/s with 0 workers, {rates[2]:.0f} with 2 workers "
          f"(ratio {rates[2] / rates[0]:.2f}; goal 1,500 with 2 workers)")


if __name__ == "__main__":
    main()
