"""The LOSO runner layer: options, plan, run directory, fold runner, callback, aggregation, SLURM.

Imports run one way (``cli -> studies -> loso -> config -> models, data -> losses, metrics, utils``)
and inside this package ``runner/slurm -> plan -> options, rundir`` and ``runner -> callback ->
aggregate -> rundir``. ``from famnet_pl.loso import run_loso`` keeps working (resolved lazily, so
importing ``famnet_pl.loso.rundir`` alone loads no torch).
"""

_EXPORTS = {"run_loso": "famnet_pl.loso.runner", "run_fold": "famnet_pl.loso.runner",
            "plan_loso": "famnet_pl.loso.plan", "LosoPlan": "famnet_pl.loso.plan",
            "LosoOptions": "famnet_pl.loso.options"}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
