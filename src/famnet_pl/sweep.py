"""Moved to :mod:`famnet_pl.studies.sweep`; this alias stays for one release (then it goes)."""

import sys
import warnings

import famnet_pl.studies.sweep as _moved

if __name__ == "__main__":  # python -m famnet_pl.sweep ... (old scripts and sweep specs)
    from famnet_pl.cli import main

    sys.exit(main(["sweep", *sys.argv[1:]]))
warnings.warn("famnet_pl.sweep moved to famnet_pl.studies.sweep", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
