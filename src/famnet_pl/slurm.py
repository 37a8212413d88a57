"""Moved to :mod:`famnet_pl.loso.slurm`; this alias stays for one release (then it goes)."""

import sys
import warnings

import famnet_pl.loso.slurm as _moved

if __name__ == "__main__":  # python -m famnet_pl.slurm ... (old scripts and sweep specs)
    sys.exit(_moved.main())
warnings.warn("famnet_pl.slurm moved to famnet_pl.loso.slurm", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
