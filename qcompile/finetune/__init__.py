"""Quantization-aware fine-tuning (`qcompile finetune`): needs torch; the deployed runtime never imports this.

`qcompile.finetune(model, config=..., data=...)` is this package called as a function (qcompile.finetune.api.finetune):
the package and the function share the name users expect, so the module is made callable.
"""

import sys
import types

__all__ = ["finetune", "FinetuneResult"]


def __getattr__(name):
    if name in __all__:
        from qcompile.finetune import api

        return getattr(api, name)
    raise AttributeError(f"module 'qcompile.finetune' has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from qcompile.finetune.api import finetune

        return finetune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
