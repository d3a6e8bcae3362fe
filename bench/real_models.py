"""Real pretrained ONNX models that Python packages ship with their weights, compiled for --target cpu.

For each model: the share of its MACs the bit kernels run, W8A8 agreement with float, W4A4 agreement with nearest
rounding and with GPTQ, that the artifact equals the fake-quant model, and batch-1 latency against onnxruntime fp32
and int8 (quantize_static), all on realistic inputs made here offline:

* text images rendered with Pillow's font and scikit-image's scanned page/text images (rapidocr's detector,
  recognizer and orientation classifier; ddddocr's recognizer),
* scikit-image's photographs (nudenet's YOLOv8n detector),
* the bytes of files on this machine (magika's file-type classifier),
* speech synthesized by espeak-ng, streamed in 32 ms chunks with the recurrent state carried (silero-vad).

Nothing is downloaded at run time: the models come from installed wheels. Install what is missing with
    pip install --no-deps rapidocr-onnxruntime nudenet magika silero-vad ddddocr && pip install scikit-image
    apt-get install espeak-ng
and run `python bench/real_models.py [--only NAME] [--write]` (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import shutil
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from _common import cpu_name, load_average, publish

HEADING = "## Real pretrained models from Python packages"


# ---------------------------------------------------------------------------------------------------------- data

def _words(n: int, rng) -> list[str]:
    import json as _json
    import os as _os
    text = " ".join(filter(None, (_json.__doc__, _os.__doc__, argparse.__doc__, subprocess.__doc__)))
    vocab = sorted({w.strip(".,;:()'\"`") for w in text.split() if w.isascii() and 2 < len(w) < 12})
    vocab = [w for w in vocab if w.isalnum()]
    return [" ".join(rng.choice(vocab, rng.integers(1, 4))) + ("" if rng.random() < 0.5 else f" {rng.integers(0, 9999)}")
            for _ in range(n)]


def _font(size: int):
    from PIL import ImageFont
    return ImageFont.load_default(size=size)


def _skimage(name: str) -> np.ndarray:
    import skimage.io
    path = Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data" / name
    img = skimage.io.imread(path)
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    return img[..., :3].astype(np.uint8)


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def text_line(text: str, h: int, w: int, rng) -> np.ndarray:
    """A text line (RGB uint8, h x w) in a random size, colour and offset, as an OCR crop looks."""
    from PIL import Image, ImageDraw
    size = int(h * rng.uniform(0.55, 0.8))
    bg = tuple(int(v) for v in rng.integers(170, 256, 3))
    fg = tuple(int(v) for v in rng.integers(0, 90, 3))
    img = Image.new("RGB", (w * 2, h), bg)
    ImageDraw.Draw(img).text((int(rng.integers(2, 10)), int((h - size) / 2 - size * 0.1)), text, fill=fg,
                             font=_font(size))
    arr = np.asarray(img)
    ink = np.where((arr != np.array(bg)).any(2).any(0))[0]
    right = min(arr.shape[1], (ink.max() + 8) if ink.size else w)
    arr = arr[:, :max(right, h)]
    scale = h / arr.shape[0]
    width = min(w, max(8, int(arr.shape[1] * scale)))
    line = np.full((h, w, 3), bg, np.uint8)
    line[:, :width] = _resize(arr, h, width)
    noise = rng.normal(0, 6, line.shape)
    return np.clip(line + noise, 0, 255).astype(np.uint8)


def page(h: int, w: int, rng) -> np.ndarray:
    """A document-like image: scanned text from scikit-image's samples or lines rendered at several sizes."""
    from PIL import Image, ImageDraw
    if rng.random() < 0.3:
        src = _skimage(str(rng.choice(["page.png", "text.png"])))
        scale = rng.uniform(1.0, 2.0)
        src = _resize(src, int(src.shape[0] * scale), int(src.shape[1] * scale))
        y = int(rng.integers(0, max(1, src.shape[0] - h)))
        x = int(rng.integers(0, max(1, src.shape[1] - w)))
        out = np.full((h, w, 3), 255, np.uint8)
        crop = src[y:y + h, x:x + w]
        out[:crop.shape[0], :crop.shape[1]] = crop
        return out
    img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(200, 256, 3)))
    draw = ImageDraw.Draw(img)
    y = int(rng.integers(2, 20))
    while y < h - 12:
        size = int(rng.integers(10, 28))
        draw.text((int(rng.integers(2, w // 3)), y), _words(1, rng)[0], fill=tuple(int(v) for v in
                                                                               rng.integers(0, 80, 3)),
                  font=_font(size))
        y += int(size * rng.uniform(1.3, 2.5))
    return np.asarray(img)


def photo(h: int, w: int, rng) -> np.ndarray:
    names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "horse.png",
             "hubble_deep_field.jpg", "retina.jpg", "camera.png", "coins.png"]
    src = _skimage(str(rng.choice(names)))
    scale = rng.uniform(0.6, 1.0)
    ch, cw = int(src.shape[0] * scale), int(src.shape[1] * scale)
    y, x = int(rng.integers(0, src.shape[0] - ch + 1)), int(rng.integers(0, src.shape[1] - cw + 1))
    img = _resize(src[y:y + ch, x:x + cw], h, w)
    return img[:, ::-1] if rng.random() < 0.5 else img


def ocr_norm(imgs) -> np.ndarray:
    """rapidocr's preprocessing: RGB -> NCHW in [-1, 1] (mean 0.5, std 0.5)."""
    return (np.stack(imgs).transpose(0, 3, 1, 2).astype(np.float32) / 255.0 - 0.5) / 0.5


def file_bytes(n: int, rng) -> np.ndarray:
    """magika's features of files on this machine: 1024 bytes from the (left-stripped) start and 1024 from the
    (right-stripped) end of the first and last 4096, padded with token 256."""
    roots = [Path("/usr/share/doc"), Path("/usr/lib/python3"), Path("/etc"), Path("/usr/share/fonts"),
             Path("/usr/bin"), Path(np.__file__).parent, Path("/usr/share/common-licenses")]
    files = []
    for root in roots:
        for p in root.rglob("*") if root.exists() else []:
            try:
                if p.is_file() and not p.is_symlink() and p.stat().st_size >= 8:
                    files.append(p)
            except OSError:
                continue
            if len(files) > 20000:
                break
    picks = rng.choice(len(files), min(n, len(files)), replace=False)
    rows = []
    for i in picks:
        data = files[i].read_bytes()
        head, tail = data[:4096].lstrip(), data[-4096:].rstrip()
        beg = list(head[:1024]) + [256] * max(0, 1024 - len(head))
        end = [256] * max(0, 1024 - len(tail)) + list(tail[-1024:])
        rows.append(beg[:1024] + end[-1024:])
    return np.array(rows, np.int32)


def speech(n_utts: int, rng, seconds: float = 3.0) -> np.ndarray:
    """[n_utts, samples] 16 kHz: espeak-ng sentences with silence and noise around them."""
    import wave
    out = []
    voices = ["en", "en-us", "de", "fr", "es"]
    for i in range(n_utts):
        with tempfile.TemporaryDirectory() as tmp:
            wav = Path(tmp) / "s.wav"
            subprocess.run(["espeak-ng", "-v", str(voices[i % len(voices)]), "-s", str(int(rng.integers(120, 190))),
                            "-w", str(wav), " ".join(_words(3, rng))], check=True, capture_output=True)
            with wave.open(str(wav)) as f:
                rate, pcm = f.getframerate(), np.frombuffer(f.readframes(f.getnframes()), np.int16)
        x = pcm.astype(np.float32) / 32768.0
        x = np.interp(np.arange(0, len(x), rate / 16000), np.arange(len(x)), x).astype(np.float32)
        total = int(seconds * 16000)
        start = int(rng.integers(0, max(1, total - len(x))))
        sig = np.zeros(total, np.float32)
        seg = x[:total - start]
        sig[start:start + len(seg)] = seg * rng.uniform(0.3, 1.0)
        sig += rng.normal(0, rng.uniform(0.001, 0.02), total).astype(np.float32)
        out.append(sig)
    return np.stack(out)


# -------------------------------------------------------------------------------------------------------- models

@dataclass
class RealModel:
    name: str
    package: str
    path: str
    kind: str                                  # what it is, for the table
    calib: Callable                            # rng -> calibration data (dict or a reader with rewind)
    evaluate: Callable                         # (run, rng) -> output array compared between engines
    metric: str                                # "top-1" | "frame top-1" | "cosine" | "decision"
    fix_inputs: dict = field(default_factory=dict)
    time_feeds: Callable | None = None         # rng -> batch-1 feeds for timing


def batched(feeds: dict, run, batch: int = 16) -> np.ndarray:
    n = len(next(iter(feeds.values())))
    return np.concatenate([run({k: v[i:i + batch] for k, v in feeds.items()})[0] for i in range(0, n, batch)])


def _ocr_lines(n, h, w, rng, flip=False):
    imgs = [text_line(t, h, w, rng) for t in _words(n, rng)]
    if flip:
        imgs = [im[::-1, ::-1] if i % 2 else im for i, im in enumerate(imgs)]
    return ocr_norm(imgs)


class SileroStream:
    """Calibration batches of silero-vad as it is deployed: 576-sample windows (64 of context + 512 new) with the
    state the float model carried to that point; a reader with rewind (artifact sizes come from its first batch)."""

    def __init__(self, audio: np.ndarray, float_run, frames_per_batch: int = 8):
        self.batches = []
        windows, states = stream_windows(audio, float_run)
        for i in range(0, len(windows), frames_per_batch):
            w, s = np.concatenate(windows[i:i + frames_per_batch]), np.concatenate(states[i:i + frames_per_batch], 1)
            self.batches.append({"input": w, "state": s})
        self.pos = 0

    def get_next(self):
        self.pos += 1
        return self.batches[self.pos - 1] if self.pos <= len(self.batches) else None

    def rewind(self):
        self.pos = 0


def stream_windows(audio: np.ndarray, run):
    """Run a VAD over [streams, samples] chunk by chunk with its own state: (windows, states) it saw, per chunk."""
    streams = audio.shape[0]
    state = np.zeros((2, streams, 128), np.float32)
    context = np.zeros((streams, 64), np.float32)
    windows, states, probs = [], [], []
    for start in range(0, audio.shape[1] - 511, 512):
        x = np.concatenate([context, audio[:, start:start + 512]], 1)
        windows.append(x)
        states.append(state)
        prob, state = run({"input": x, "state": state, "sr": np.array(16000, np.int64)})
        probs.append(prob)
        context = x[:, -64:]
    stream_windows.probs = np.concatenate(probs, 1)
    return windows, states


def silero_eval(run, rng):
    stream_windows(speech(12, np.random.default_rng(7)), run)
    return stream_windows.probs


def ddddocr_lines(n, rng):
    return np.stack([text_line(t, 64, 192, rng).mean(2, keepdims=True).transpose(2, 0, 1) / 255.0
                     for t in _words(n, rng)]).astype(np.float32)


class OneByOne:
    """A calibration reader giving batches of one: ddddocr's input has a fixed batch of 1."""

    def __init__(self, name, arrays):
        self.name, self.arrays, self.pos = name, arrays, 0

    def get_next(self):
        self.pos += 1
        return {self.name: self.arrays[self.pos - 1:self.pos]} if self.pos <= len(self.arrays) else None

    def rewind(self):
        self.pos = 0


MODELS = [
    RealModel("rapidocr text detector (PP-OCRv4 DBNet)", "rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx",
              "CNN, segmentation",
              lambda rng: {"x": ocr_norm([page(320, 320, rng) for _ in range(32)])},
              lambda run, rng: batched({"x": ocr_norm([page(320, 320, rng) for _ in range(24)])}, run, 8),
              "text-mask IoU"),
    RealModel("rapidocr orientation classifier", "rapidocr_onnxruntime",
              "models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "CNN, classifier",
              lambda rng: {"x": _ocr_lines(128, 48, 192, rng, flip=True)},
              lambda run, rng: batched({"x": _ocr_lines(300, 48, 192, rng, flip=True)}, run), "top-1"),
    RealModel("rapidocr text recognizer (PP-OCRv4 SVTR)", "rapidocr_onnxruntime",
              "models/ch_PP-OCRv4_rec_infer.onnx", "CNN + transformer blocks, CTC",
              lambda rng: {"x": _ocr_lines(96, 48, 320, rng)},
              lambda run, rng: batched({"x": _ocr_lines(160, 48, 320, rng)}, run), "frame top-1"),
    RealModel("nudenet detector (YOLOv8n)", "nudenet", "320n.onnx", "CNN, detector",
              lambda rng: {"images": np.stack([photo(320, 320, rng) for _ in range(48)]).transpose(0, 3, 1, 2)
                           .astype(np.float32) / 255},
              lambda run, rng: batched({"images": np.stack([photo(320, 320, rng) for _ in range(48)])
                                        .transpose(0, 3, 1, 2).astype(np.float32) / 255}, run, 8)[:, 4:],
              "cosine"),
    RealModel("magika file-type classifier", "magika", "models/standard_v3_3/model.onnx",
              "embedding + dense/attention mixer, classifier",
              lambda rng: {"bytes": file_bytes(256, rng)},
              lambda run, rng: batched({"bytes": file_bytes(600, rng)}, run, 64), "top-1"),
    RealModel("silero-vad (16 kHz, streaming)", "silero_vad", "data/silero_vad.onnx",
              "1-D CNN + LSTM, streaming state",
              None, silero_eval, "decision", fix_inputs={"sr": [16000]}),
    RealModel("ddddocr captcha recognizer", "ddddocr", "common.onnx", "CNN + LSTM, CTC",
              lambda rng: OneByOne("input1", ddddocr_lines(48, rng)),
              lambda run, rng: np.concatenate([run({"input1": x[None]})[0] for x in ddddocr_lines(60, rng)], 1),
              "frame top-1"),
]


def locate(m: RealModel) -> Path | None:
    spec = importlib.util.find_spec(m.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / m.path
    return path if path.is_file() else None


# -------------------------------------------------------------------------------------------------------- metrics

def agreement(metric: str, ref: np.ndarray, out: np.ndarray) -> float:
    if metric == "top-1":
        return float((ref.argmax(-1) == out.argmax(-1)).mean())
    if metric == "frame top-1":
        return float((ref.argmax(-1) == out.argmax(-1)).mean())
    if metric == "decision":
        return float(((ref > 0.5) == (out > 0.5)).mean())
    if metric == "text-mask IoU":   # DBNet's text pixels: probability above its threshold 0.3
        a, b = ref > 0.3, out > 0.3
        return float((a & b).sum() / max((a | b).sum(), 1))
    a, b = ref.reshape(len(ref), -1).astype(np.float64), out.reshape(len(out), -1).astype(np.float64)
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)))


def ort_runner(model):
    from qcompile.evaluate import session
    sess = session(model)
    names = {i.name for i in sess.get_inputs()}
    return lambda feeds: sess.run(None, {k: v for k, v in feeds.items() if k in names})


def artifact_runner(path):
    from qcompile.runtime import InferenceSession
    sess = InferenceSession(path)
    names = {i.name for i in sess.get_inputs()}
    return lambda feeds: sess.run(None, {k: v for k, v in feeds.items() if k in names})


def best_ms(run, feeds, reps: int = 30) -> float:
    from qcompile.benchmark import settle
    settle()
    for _ in range(3):
        run(feeds)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run(feeds)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


# -------------------------------------------------------------------------------------------------------- main

def measure(m: RealModel, path: Path, work: Path) -> dict:
    from qcompile import api
    from qcompile.macs import INTEGER_KERNELS, share_in_bit_kernels

    rng = np.random.default_rng(0)
    float_run = ort_runner(path)
    calib = m.calib(rng) if m.calib is not None else SileroStream(speech(24, np.random.default_rng(3)), float_run)
    row = {"model": m.name, "package": m.package, "file": m.path, "kind": m.kind, "metric": m.metric}
    ref = m.evaluate(float_run, np.random.default_rng(11))
    feeds = _first_batch(calib)
    one = {k: (v[:, :1] if k == "state" else v[:1]) if np.ndim(v) else v for k, v in feeds.items()}
    one.update({k: np.array(v[0], np.int64) for k, v in m.fix_inputs.items()})
    fixed = m.fix_inputs or None

    def compile_(config, target=None, **kw):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return api.compile(path, config=config, calib=calib, target=target, fix_inputs=fixed, plan_batch=1, **kw)

    def agree(model):
        return agreement(m.metric, ref, m.evaluate(ort_runner(model), np.random.default_rng(11)))

    fp32 = ort_runner(path)
    row["ms"] = {"onnxruntime fp32": best_ms(fp32, one)}
    try:
        int8_path = ort_int8(path, calib, work, m.fix_inputs)
        row["ort_int8"] = agree(int8_path)
        row["ms"]["onnxruntime int8"] = best_ms(ort_runner(int8_path), one)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's quantizer fails on some models: a cell, not the row
        row["ort_int8_error"] = str(exc).splitlines()[0][:120]
    for config, extra in (("w8a8", {}), ("w4a4", {"quantizer": "uniform"}),
                          ("w4a4_forced", {"quantizer": "uniform", "kernel": "bitserial"})):
        start = time.perf_counter()
        result = compile_(config.split("_")[0], "cpu", **extra)
        row[f"{config}_compile_s"] = round(time.perf_counter() - start, 1)
        art = work / config
        result.save(art, plots=False)
        run = artifact_runner(art)
        out = m.evaluate(run, np.random.default_rng(11))
        fq = m.evaluate(ort_runner(result.model), np.random.default_rng(11))
        row[config] = agreement(m.metric, ref, out)
        row[f"{config}_artifact_equals_fakequant"] = bool(np.array_equal(out, fq))
        row[f"{config}_artifact_max_diff"] = float(np.abs(out.astype(np.float64) - fq).max())
        row[f"{config}_fakequant"] = agreement(m.metric, ref, fq)
        plan = result.manifest["plan"]
        share, total = share_in_bit_kernels(result.float_model, {k: v for k, v in one.items()
                                                                 if k not in m.fix_inputs}, plan)
        row[f"{config}_bit_mac_share"], row["macs_per_sample"] = share, total
        row[f"{config}_integer_mac_share"] = share_in_bit_kernels(
            result.float_model, {k: v for k, v in one.items() if k not in m.fix_inputs}, plan, INTEGER_KERNELS)[0]
        row[f"{config}_bit_layers"] = sum(p["kernel"].startswith(("bitserial", "lut")) for p in plan)
        row["weighted_layers"] = len(plan)
        row["ms"][f"qcompile {config}"] = best_ms(run, one)
        shutil.rmtree(art, ignore_errors=True)
    row["w4a4_gptq"] = agree(compile_("w4a4", quantizer="uniform", weight_rounding="gptq").model)
    row["w4a4_balanced"] = agree(compile_("w4a4").model)
    return row


def ort_int8(path: Path, calib, work: Path, fixed: dict) -> Path:
    """onnxruntime's own static int8 quantization (QDQ, per-channel int8 weights, uint8 activations) calibrated on the
    same data: the yardstick for the W8A8 agreement and for int8 latency."""
    import logging

    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static

    batches = list(_batches(calib))
    for b in batches:
        b.update({k: np.array(v[0], np.int64) for k, v in fixed.items()})

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            return next(self.it, None)

    out = work / "ort_int8.onnx"
    logging.getLogger().setLevel(logging.ERROR)
    quantize_static(str(path), str(out), Reader(), per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    return out


def _batches(calib, size: int = 16):
    if isinstance(calib, dict):
        n = next(len(v) for v in calib.values() if np.ndim(v))
        for i in range(0, n, size):
            yield {k: v[i:i + size] if np.ndim(v) else v for k, v in calib.items()}
        return
    calib.rewind()
    while (batch := calib.get_next()) is not None:
        yield dict(batch)
    calib.rewind()


def _first_batch(calib) -> dict:
    if isinstance(calib, dict):
        return {k: v[:8] if np.ndim(v) else v for k, v in calib.items()}
    calib.rewind()
    batch = calib.get_next()
    calib.rewind()
    return batch


def render(rows: list[dict]) -> str:
    lines = [HEADING, "",
             f"`python bench/real_models.py --write` on {cpu_name()} (load {load_average()}), "
             f"{time.strftime('%Y-%m-%d')}. Pretrained ONNX models shipped inside Python wheels, compiled with "
             "`--target cpu --plan-batch 1` on realistic inputs made offline (rendered and scanned text, "
             "scikit-image photographs, the bytes of files on this machine, espeak-ng speech streamed with its "
             "state).", "",
             "* **Agreement** with the float model: top-1 (per CTC frame for recognizers), the IoU of the text "
             "pixels (probability > 0.3, DBNet's threshold) for the text detector, the cosine of the class-score map "
             "for the object detector, the speech/non-speech decision per 32 ms frame for the VAD (run as a stream, each "
             "engine carrying its own state). W4A4 uses `--quantizer uniform`; the last agreement column is the "
             "W4A4 preset's balanced quantizer, which post-training loses far more (it is made for training). "
             "ORT int8: onnxruntime's `quantize_static` (per-channel QDQ) on the same calibration data, the yardstick.",
             "* **Bit kernels**: layers the planner put on bit kernels, and their share of the model's "
             "multiply-accumulates per sample (in brackets at W8A8: with the layers on onnxruntime's int8 ops, which "
             "take 8-bit layers' 9-bit weight integers as 2 x int8 + an offset). The rest runs on onnxruntime: first/last layers, layers whose bit "
             "kernel the planner estimates slower (8-bit layers: 64 bit-plane products; they go to int8 or stay fake-quant), recurrent cells, "
             "activation-by-activation MatMuls.",
             "* **artifact = fake-quant**: the compiled artifact's outputs on the evaluation inputs equal "
             "onnxruntime running the fake-quant model, bit for bit.",
             "* **Latency**: batch 1, median, one process. The artifact runs as one onnxruntime session with the bit "
             "layers as custom ops; a quantized layer the planner leaves on onnxruntime runs as fake-quant (its "
             "weights dequantized at every run), which is what keeps W8A8 behind fp32 here.", "",
             "| model | kind | MACs/sample | W8A8 agreement | ORT int8 agreement | W4A4 nearest | W4A4 GPTQ | "
             "W4A4 balanced | artifact = fake-quant |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    done = [r for r in rows if "error" not in r]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r.get('kind', '')} | error: {r['error']} |" + " |" * 6)
            continue
        configs = ("w8a8", "w4a4", "w4a4_forced")
        same = all(r[f"{c}_artifact_equals_fakequant"] for c in configs)
        diff = max(r[f"{c}_artifact_max_diff"] for c in configs)
        ort8 = f"{r['ort_int8']:.1%}" if "ort_int8" in r else "its model does not load"
        lines.append(
            f"| {r['model']} (`{r['package']}`) | {r['kind']} | {r['macs_per_sample'] / 1e6:.0f} M | "
            f"{r['w8a8']:.1%} ({r['metric']}) | {ort8} | {r['w4a4']:.1%} | {r['w4a4_gptq']:.1%} | "
            f"{r['w4a4_balanced']:.1%} | {'yes' if same else 'max diff %.1e' % diff} |")
    lines += ["", "Bit kernels and batch-1 latency (ms, median; ratios against onnxruntime fp32 / int8):", "",
              "| model | ORT fp32 | ORT int8 | W8A8: bit layers, MACs (integer MACs) | W8A8 ms | W4A4 planner: "
              "bit layers, MACs | W4A4 ms | W4A4 all on bit kernels: MACs | ms |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in done:
        ms = r["ms"]
        fp32, int8 = ms["onnxruntime fp32"], ms.get("onnxruntime int8")

        def t(key):
            q = ms[f"qcompile {key}"]
            return f"{q:.2f} ({fp32 / q:.2f}x / " + (f"{int8 / q:.2f}x)" if int8 else "n/a)")

        lines.append(
            f"| {r['model']} | {fp32:.2f} | {f'{int8:.2f}' if int8 else 'n/a'} | "
            f"{r['w8a8_bit_layers']}/{r['weighted_layers']}, {r['w8a8_bit_mac_share']:.0%} "
            f"({r['w8a8_integer_mac_share']:.0%}) | {t('w8a8')} | {r['w4a4_bit_layers']}/{r['weighted_layers']}, "
            f"{r['w4a4_bit_mac_share']:.0%} | {t('w4a4')} | {r['w4a4_forced_bit_mac_share']:.0%} | "
            f"{t('w4a4_forced')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="substring of the model names to run")
    ap.add_argument("--write", action="store_true", help="put the table into bench/RESULTS.md")
    ap.add_argument("--json", type=Path, default=Path(__file__).with_name("real_models.json"))
    ap.add_argument("--from-json", action="store_true", help="render the table from --json instead of measuring")
    args = ap.parse_args()
    if args.from_json:
        publish(HEADING, render(json.loads(args.json.read_text())), args.write)
        return
    rows = []
    for m in MODELS:
        if args.only and args.only.lower() not in m.name.lower():
            continue
        path = locate(m)
        if path is None:
            print(f"skip {m.name}: `pip install --no-deps {m.package.replace('_', '-')}` to get {m.path}")
            continue
        print(f"== {m.name}: {path}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                rows.append(measure(m, path, Path(tmp)))
            except Exception as exc:  # noqa: BLE001 - one model's failure is a row of the table, not the end
                rows.append({"model": m.name, "kind": m.kind, "error": str(exc).splitlines()[0][:160]})
        print(json.dumps(rows[-1], default=str), flush=True)
    args.json.write_text(json.dumps(rows, indent=1, default=str))
    publish(HEADING, render(rows), args.write)


if __name__ == "__main__":
    main()
