"""nmt: GNMT-style recurrent and TCN convolutional neural machine translation."""

__version__ = "0.1.0"
