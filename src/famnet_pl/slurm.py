"""Moved to :mod:`famnet_pl.loso.slurm`; this alias stays for one release (then it goes)."""

import sys
import warnings

import famnet_pl.loso.slurm as _moved

if __name__ == "__main__":  # python -m famnet_pl.slurm ... (old scripts and sweep specs)
    from famnet_pl.cli import main

    sys.exit(main(["slurm", *sys.argv[1:]]))
warnings.warn("famnet_pl.slurm moved to famnet_pl.loso.slurm", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
