"""Moved to :mod:`famnet_pl.loso.aggregate`; this alias stays for one release (then it goes)."""

import sys
import warnings

import famnet_pl.loso.aggregate as _moved

warnings.warn("famnet_pl.aggregate moved to famnet_pl.loso.aggregate", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
