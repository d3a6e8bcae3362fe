"""qcompile: a hardware-aware low-bit model-compression compiler."""

__version__ = "0.1.0"
