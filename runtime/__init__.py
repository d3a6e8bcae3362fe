"""The deployed runtime: needs numpy, onnxruntime and a compiled artifact (no onnx, torch, click or compiler)."""

from qcompile.runtime.inference import InferenceSession, NodeArg

__all__ = ["InferenceSession", "NodeArg"]
