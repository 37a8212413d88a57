"""Thread oversubscription: one STSTNet training step (batch 32, 3x28x28 flow images) timed alone
at 1 and 2 torch threads, then with two such processes at once, each at 1 and at 2 threads. On a
2-core machine two processes of 2 threads each fight over the cores; the runner therefore gives
every fold process and DataLoader worker ``cores / processes`` threads (loso/runner.py). Prints
figures; asserts nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

STEPS = 200


def step_ms(threads: int) -> float:
    import torch

    from famnet_pl.models.registry import create_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = create_model("ststnet", num_classes=3, num_aus=0, in_channels_2d=3)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x, y = torch.randn(32, 3, 28, 28), torch.randint(0, 3, (32,))
    for i in range(STEPS + 20):
        if i == 20:  # warm-up steps not timed
            start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(net(x2d=x)["emotion"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / STEPS * 1e3


def concurrent(threads: int) -> list[float]:
    """Two processes at once, each timing its own steps."""
    cmd = [sys.executable, __file__, "--child", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    return [json.loads(p.communicate()[0])["ms"] for p in procs]


def main() -> None:
    cores = os.cpu_count() or 1
    alone = {t: step_ms(t) for t in (1, 2)}
    print(f"STSTNet training step, batch 32, {cores} cores: alone 1 thread {alone[1]:.2f} ms, "
          f"2 threads {alone[2]:.2f} ms (ratio 2/1: {alone[2] / alone[1]:.2f})")
    for t in (1, 2):
        ms = concurrent(t)
        print(f"  two processes at once, {t} thread(s) each: {ms[0]:.2f} / {ms[1]:.2f} ms per step "
              f"({max(ms) / alone[1]:.1f}x the 1-thread step alone)")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps({"ms": step_ms(int(sys.argv[2]))}))
    else:
        main()
