"""User-facing errors: one line naming the file or node and what to do.

The CLI turns any QcompileError into `error: <message>` and exit status 1; nothing else is caught.
"""


class QcompileError(Exception):
    """Base class of every error a user can cause (bad input, missing toolchain)."""


class ModelLoadError(QcompileError):
    """The model file is missing, truncated, not ONNX, or uses an unsupported opset."""


class CalibrationError(QcompileError):
    """Calibration data missing, of the wrong shape or dtype, or unusable."""


class QuantizationError(QcompileError):
    """A tensor cannot be quantized (NaN/Inf values, unknown quantizer, bad bit width)."""


class ConstantTensorError(QuantizationError):
    """All values equal: no range to scale. Keep the layer in float."""


class ConfigError(QcompileError):
    """Unknown preset, quantizer name, or malformed override."""


class ToolchainError(QcompileError):
    """A compiler (cc, nvcc, ...) needed for a target is missing or failed."""


class ArtifactError(QcompileError):
    """A compiled artifact is missing files, tampered with, or of an unknown schema."""


class RuntimeInputError(QcompileError):
    """A run-time feed has the wrong name, shape or dtype."""
