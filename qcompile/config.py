"""Compile configuration: presets (w1a1, w1a2, w2a2, w4a4), TOML files and keyword overrides."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

from qcompile.errors import ConfigError

QUANTIZERS = ("balanced", "balanced-mean", "dorefa", "rnn-balanced", "uniform", "uniform-percentile", "xnor")


@dataclass(frozen=True)
class Config:
    """What to quantize and how. Every field can be overridden from the CLI, the API or a TOML file."""

    bits_w: int = 2
    bits_a: int = 2
    quantizer: str = "balanced"          # weight quantizer, a name in qcompile.quant.registry
    per_channel: bool = True             # one weight scale per output channel (the kernels support both)
    keep_first_last_float: bool = True   # DoReFa's convention: first and last weighted layer stay float
    keep_float: tuple[str, ...] = ()     # node-name globs forced to stay float
    quantize: tuple[str, ...] = ()       # node-name globs forced to be quantized (beats the two above)
    act_clip: str = "mse"                # "mse" | "max" | "percentile:99.99": how calibration picks clip c
    bias_correction: bool = True         # fold E[(W - Wq) x] from calibration into the bias
    calib_batches: int = 64              # at most this many calibration batches are read
    layer_bits: tuple[tuple[str, int, int], ...] = ()  # (node-name glob, bits_w, bits_a): the first match wins
    weight_rounding: str = "nearest"     # "nearest" | "gptq": which grid level each weight takes (quant/gptq.py)
    name: str = "custom"

    def __post_init__(self):
        for what, bits in (("bits_w", self.bits_w), ("bits_a", self.bits_a)):
            if not 1 <= bits <= 8:
                raise ConfigError(f"{what}={bits}: must be between 1 and 8 (qcompile targets 1-4 bit)")
        if self.quantizer not in QUANTIZERS:
            raise ConfigError(f"unknown quantizer '{self.quantizer}'; choose one of {', '.join(QUANTIZERS)}")
        for glob, bw, ba in self.layer_bits:
            for what, bits in (("bits_w", bw), ("bits_a", ba)):
                if not isinstance(bits, int) or not 1 <= bits <= 8:
                    raise ConfigError(f"layers.'{glob}': {what}={bits!r} must be between 1 and 8")
        if self.weight_rounding not in ("nearest", "gptq"):
            raise ConfigError(f"weight_rounding '{self.weight_rounding}': use nearest or gptq")
        kind = self.act_clip.split(":")[0]
        if kind not in ("mse", "max", "percentile"):
            raise ConfigError(f"act_clip '{self.act_clip}': use mse, max or percentile:<p>")
        if kind == "percentile":
            try:
                p = float(self.act_clip.split(":")[1])
            except (IndexError, ValueError):
                raise ConfigError(f"act_clip '{self.act_clip}': write percentile:<p>, e.g. percentile:99.99") from None
            if not 50 < p <= 100:
                raise ConfigError(f"act_clip '{self.act_clip}': the percentile must be in (50, 100]")

    def replace(self, **changes) -> "Config":
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ConfigError(f"unknown config key(s) {sorted(unknown)}; valid: {sorted(known)}")
        for key in ("keep_float", "quantize"):
            if key in changes and changes[key] is not None:
                changes[key] = tuple(changes[key])
        if changes.get("layer_bits") is not None:
            changes["layer_bits"] = tuple(tuple(x) for x in changes["layer_bits"])
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, Config] = {
    "w1a1": Config(bits_w=1, bits_a=1, name="w1a1"),
    "w1a2": Config(bits_w=1, bits_a=2, name="w1a2"),
    "w2a2": Config(bits_w=2, bits_a=2, name="w2a2"),
    "w4a4": Config(bits_w=4, bits_a=4, name="w4a4"),
    # 8-bit: what most users try first; min-max uniform weights (256 balanced bins buy nothing at 8 bits)
    "w8a8": Config(bits_w=8, bits_a=8, quantizer="uniform", name="w8a8"),
    "w8a4": Config(bits_w=8, bits_a=4, quantizer="uniform", name="w8a4"),
    "w4a8": Config(bits_w=4, bits_a=8, name="w4a8"),
    "w2a8": Config(bits_w=2, bits_a=8, name="w2a8"),
    "w2a4": Config(bits_w=2, bits_a=4, name="w2a4"),
}


def resolve_config(config: str | Config | None = None, **overrides) -> Config:
    """A preset name, a TOML file path, or a Config; then keyword overrides (None means 'not given')."""
    if config is None:
        base = PRESETS["w2a2"]
    elif isinstance(config, Config):
        base = config
    elif config in PRESETS:
        base = PRESETS[config]
    elif str(config).endswith(".toml"):
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
        preset = data.pop("preset", None)
        layers = data.pop("layers", {})
        if not isinstance(layers, dict):
            raise ConfigError(f"{path}: [layers] must map node-name globs to a preset (\"w4a4\") or "
                              "{{bits_w = .., bits_a = ..}}")
        data["layer_bits"] = [(glob, *_layer_bits(path, glob, spec)) for glob, spec in layers.items()]
        base = resolve_config(preset).replace(name=path.stem, **data)
    else:
        raise ConfigError(f"unknown config '{config}'; use a preset ({', '.join(PRESETS)}) or a .toml file")
    return base.replace(**overrides)


def _layer_bits(path, glob: str, spec) -> tuple[int, int]:
    """A [layers] entry: a preset name ("w4a4") or a table {bits_w = 4, bits_a = 8}."""
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ConfigError(f"{path}: layers.'{glob}' = '{spec}': not a preset ({', '.join(PRESETS)})")
        return PRESETS[spec].bits_w, PRESETS[spec].bits_a
    if isinstance(spec, dict) and set(spec) <= {"bits_w", "bits_a"} and spec:
        return spec.get("bits_w", 2), spec.get("bits_a", 2)
    raise ConfigError(f"{path}: layers.'{glob}': write a preset (\"w4a4\") or {{bits_w = 4, bits_a = 8}}")


def bits_fit_int4(bits_w: int) -> bool:
    """Weight integers 2q - zero2 lie in [-(2^k - 1), 2^k - 1]: INT4 holds them up to k = 3."""
    return bits_w <= 3


__all__ = ["Config", "PRESETS", "QUANTIZERS", "resolve_config"]
