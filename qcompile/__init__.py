"""qcompile: a hardware-aware low-bit model-compression compiler.

`qcompile.compile(...)` and `qcompile.inspect(...)` load the compiler lazily, so that `qcompile.runtime` imports with
only numpy and onnxruntime installed.
"""

__version__ = "0.1.0"
__all__ = ["compile", "inspect", "finetune", "__version__"]


def __getattr__(name):
    if name in ("compile", "inspect"):
        from qcompile import api

        return getattr(api, name)
    if name == "finetune":  # the package, callable as qcompile.finetune(model, ...)
        import importlib

        return importlib.import_module("qcompile.finetune")
    raise AttributeError(f"module 'qcompile' has no attribute {name!r}")
