"""Studies built from many LOSO runs: W&B sweeps (``sweep``) and the ablation table (``ablation``)."""
