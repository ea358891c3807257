"""What a tensor quantizer does, and the error of a numerical fault at a site.

A leaf module (it imports nothing from quant/): the model and the remedies that change
its parameters (:mod:`quant.smooth`, :mod:`quant.bias_correction`) share these without
importing each other.
"""

FLOAT, OBSERVE, QUANT = "float", "observe", "quant"  # identity, calibration observer, fake-quant


class SiteError(RuntimeError):
    """A numerical fault at a named site (NaN/Inf, no calibration data)."""
