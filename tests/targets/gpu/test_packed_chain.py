"""Chains of bit layers on the GPU: a threshold epilogue writes the next layer's packed bit planes and code sums, so
no pack kernel runs between the layers (targets/gpu/chain.py, bitkernels.cuh::pack_output).

Kernel chains run on the host emulation of the CUDA source through the runtime's launcher, on both GEMM paths,
bit-exact against qcompile.reference applied layer by layer; a compiled gpu artifact shows the chain in its
schedule and its launch log and equals the fake-quant model.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs import bn_params
from qcompile.errors import RuntimeInputError
from qcompile.targets.cpu import LayerSpec
from qcompile.targets.gpu.build import build_emulation
from qcompile.targets.gpu.chain import chain_refusal
from qcompile.runtime.gpu import EmuDevice, GpuLibrary

from tests.targets.gpu.gpu_cases import build_emulated, have_nvcc, reference_output, same_bits


def _thresholds(rng, spec_k: int, n: int, levels: int, bits_w: int, bits_a: int) -> np.ndarray:
    """Ascending thresholds spread over the middle of the accumulator's range, so every code occurs."""
    bound = spec_k * ((1 << bits_a) - 1) * (1 << bits_w) // 6
    return np.sort(rng.integers(-bound, bound + 1, (n, levels)), axis=1).astype(np.int32)


def _layer(rng, name, op, ba, bw, n, k_shape, epilogue, levels=0, xor=False, **geo):
    w = rng.integers(0, 1 << bw, (n, *k_shape), dtype=np.uint8)
    z2 = np.ones(n, np.int32) if xor else (2 * rng.integers(0, 1 << bw, n)).astype(np.int32)
    extra = {}
    if epilogue == "threshold":
        extra["thresholds"] = _thresholds(rng, int(np.prod(k_shape)), n, levels, bw, ba)
    if epilogue == "float":
        extra.update(mult=rng.standard_normal(n).astype(np.float32), bias=rng.standard_normal(n).astype(np.float32))
    return LayerSpec(name, op, ba, bw, w, z2, epilogue=epilogue, xor_mode=xor, **geo, **extra)


def chain_specs() -> dict[str, list[LayerSpec]]:
    """Chains of layers, each layer reading the previous one's codes."""
    rng = np.random.default_rng(15)
    gemm = lambda name, ba, bw, k, n, epi, levels=0, xor=False: _layer(  # noqa: E731
        rng, name, "gemm", ba, bw, n, (k,), epi, levels, xor)
    conv = lambda name, ba, bw, chw, n, kernel, epi, levels=0, xor=False, group=1, **geo: _layer(  # noqa: E731
        rng, name, "conv", ba, bw, n, (chw[0] // group, *kernel), epi, levels, xor, in_shape=chw, group=group, **geo)
    return {
        # N = 300 outputs: three 128-wide channel tiles (code sums added up across blocks), K = 300 not a multiple
        # of 32; then a 1-bit xor-mode reader of 130 codes
        "gemm_a2_a2_xor": [gemm("ga", 2, 1, 70, 300, "threshold", 3), gemm("gb", 2, 2, 300, 130, "threshold", 1),
                           gemm("gc", 1, 1, 130, 37, "float", xor=True)],
        # an 8-bit weight producer has 16-channel tiles: every consumer word is OR-ed from two blocks (zeroed first)
        "gemm_w8_tiles": [gemm("gd", 1, 8, 45, 70, "threshold", 3), gemm("ge", 2, 1, 70, 9, "none")],
        # 70 channels (not a multiple of 32), a strided conv with asymmetric padding reading them
        "conv_c70_stride_pad": [conv("ca", 2, 1, (5, 9, 7), 70, (3, 3), "threshold", 3, pads=(1, 1, 1, 1)),
                                conv("cb", 2, 2, (70, 9, 7), 33, (3, 3), "threshold", 3, strides=(2, 2),
                                     pads=(1, 0, 2, 1)),
                                conv("cc", 2, 1, (33, 5, 3), 6, (3, 3), "float", pads=(1, 1, 1, 1))],
        # grouped producer (2 x 70 channels) into a grouped reader (2 groups of 70): group boundaries inside words
        # and tiles; then a 1x1 reader with 5 groups of 8 channels; then a padded xor-mode conv
        "conv_groups_xor": [conv("cd", 1, 2, (6, 6, 5), 140, (3, 3), "threshold", 3, group=2, pads=(1, 1, 1, 1)),
                            conv("ce", 2, 1, (140, 6, 5), 40, (3, 3), "threshold", 3, group=2, pads=(0, 1, 1, 0)),
                            conv("cf", 2, 2, (40, 5, 4), 65, (1, 1), "threshold", 1, group=5),
                            conv("cg", 1, 1, (65, 5, 4), 5, (3, 3), "none", xor=True, pads=(1, 1, 1, 1))],
    }


CHAINS = chain_specs()
SPECS = [s for chain in CHAINS.values() for s in chain]
BATCHES = {"gemm_a2_a2_xor": (1, 130), "gemm_w8_tiles": (1, 3), "conv_c70_stride_pad": (1, 3),
           "conv_groups_xor": (1, 2)}


nvcc_needed = pytest.mark.skipif(not have_nvcc(), reason="nvcc (CUDA toolkit) not installed: the chained kernels "
                                                          "are not compiled for sm_80/sm_90 here")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The chains' sources (no fatbin yet), nvcc for sm_80 + sm_90 started in the background, the emulation built
    meanwhile."""
    chains = {p.name: c.name for chain in CHAINS.values() for p, c in zip(chain, chain[1:])}
    built = build_emulated(SPECS, tmp_path_factory.mktemp("gpu_chains"), ("80", "90"), chains=chains)
    yield built
    job = built["nvcc"]
    if job is not None and job.poll() is None:
        job.kill()


@pytest.fixture(scope="module")
def lib(built):
    return GpuLibrary(built["manifest"], EmuDevice(built["so"]))


@pytest.mark.parametrize("path", ["mma", "popc"])
@pytest.mark.parametrize("chain", list(CHAINS))
def test_chain_bit_exact_without_pack_kernels(lib, monkeypatch, chain, path):
    monkeypatch.setenv("QCOMPILE_GPU_PATH", path)
    layers = CHAINS[chain]
    rng = np.random.default_rng(len(chain))
    for batch in BATCHES[chain]:
        x = rng.integers(0, 1 << layers[0].bits_a, (batch, *layers[0].in_shape), dtype=np.uint8)
        want = x
        for spec in layers:
            want = reference_output(spec, want)
        lib.launch_log.clear()
        ptr = lib.upload(x)
        for i, spec in enumerate(layers):
            into = layers[i + 1].name if i + 1 < len(layers) else None
            out = lib.run_device(spec.name, ptr if i == 0 else None, batch, into=into, packed_input=i > 0)
        got = lib.download(out, want.shape, want.dtype)
        lib.device.free(ptr)
        assert same_bits(got, want), f"{chain} batch {batch} on the {path} path differs from qcompile.reference"
        kernels = [k for k in lib.launch_log if k != "memset"]
        packs = [k for k in kernels if k.endswith("_pack")]
        assert len(packs) == 1 and layers[0].name in packs[0], kernels     # only the chain's first layer packs
        assert [k.endswith(f"_{path}_packed") for k in kernels[1:]] == [True] * (len(layers) - 1) + [False]


def test_chain_equals_the_unchained_layers(lib):
    """The consumer reads the same input either way: its own pack kernel over the producer's uint8 codes."""
    first, second = CHAINS["conv_groups_xor"][:2]
    x = np.random.default_rng(5).integers(0, 2, (2, *first.in_shape), dtype=np.uint8)
    unchained = lib.run(second.name, lib.run(first.name, x))
    ptr = lib.upload(x)
    lib.run_device(first.name, ptr, 2, into=second.name)
    chained = lib.download(lib.run_device(second.name, None, 2, packed_input=True), unchained.shape, np.uint8)
    lib.device.free(ptr)
    assert np.array_equal(chained, unchained)


def test_shared_words_are_zeroed_first(lib):
    """Words two producer blocks share are OR-ed: only those chains zero the consumer's planes before the GEMM."""
    zeroed = {name for name, e in lib.layers.items() if e.get("packed_out", {}).get("zero_act")}
    # gd: 16-channel tiles; ce: its 2 groups of 20 split cf's 8-channel groups' words; cf: 5 groups of 13 in cg's
    # 32-channel words. cd's groups (70) are ce's groups: its tile edges fall on word edges.
    assert zeroed == {"gd", "ce", "cf"}
    steps, _ = lib.launches("gd", 0, 1, into="ge")
    assert sum(type(s).__name__ == "Memset" for s in steps) == 2       # the code sums and the planes
    steps, _ = lib.launches("ga", 0, 1, into="gb")
    assert sum(type(s).__name__ == "Memset" for s in steps) == 1       # the code sums only


def test_wrong_consumer_is_refused(lib):
    with pytest.raises(RuntimeInputError, match="layer ga cannot write gc's packed input .*chain into gb"):
        lib.launches("ga", 0, 1, into="gc")


def test_what_does_not_chain():
    rng = np.random.default_rng(1)
    thr = _layer(rng, "t", "gemm", 2, 1, 16, (8,), "threshold", 3)
    assert chain_refusal(thr, _layer(rng, "u", "gemm", 2, 1, 4, (16,), "none")) is None
    assert "float values" in chain_refusal(_layer(rng, "f", "gemm", 2, 1, 16, (8,), "float"),
                                           _layer(rng, "u", "gemm", 2, 1, 4, (16,), "none"))
    assert "do not fit u's 1 bits" in chain_refusal(thr, _layer(rng, "u", "gemm", 1, 1, 4, (16,), "none"))
    assert "reads [12]" in chain_refusal(thr, _layer(rng, "u", "gemm", 2, 1, 4, (12,), "none"))
    conv = _layer(rng, "c", "conv", 2, 1, 4, (3, 3, 3), "threshold", 3, in_shape=(3, 4, 4), pool=(2, 2))
    assert "folded max-pool" in chain_refusal(conv, _layer(rng, "u", "conv", 2, 1, 4, (4, 1, 1), "none",
                                                             in_shape=(4, 1, 1)))
    conv.pool = None
    assert "conv -> gemm" in chain_refusal(conv, _layer(rng, "u", "gemm", 2, 1, 4, (16,), "none"))
    pool = LayerSpec.maxpool("p", (16, 1, 1), (1, 1))
    assert "only BitGemm / BitConv" in chain_refusal(thr, pool)


# ---------------------------------------------------------------------------------------------------- artifact
def chain_cnn(seed: int = 0) -> onnx.ModelProto:
    """conv0 (float) -> conv1 (stride 2, asymmetric pads, 70 ch) -> conv2 (36 ch) -> conv3 (stride 2) -> Flatten ->
    fc1 (100) -> fc2 (65) -> fc3 (float); BN + ReLU after every conv and ReLU after fc1, fc2. Chains: conv1 ->
    conv2 -> conv3 and fc1 -> fc2; the Flatten between conv3 and fc1 keeps uint8 codes."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), name))

    def conv(name, x, cin, cout, stride=1, pads=(1, 1, 1, 1)):
        init(f"{name}.w", rng.normal(0, (2 / (cin * 9)) ** 0.5, (cout, cin, 3, 3)))
        nodes.append(helper.make_node("Conv", [x, f"{name}.w"], [f"{name}.y"], name=name, pads=list(pads),
                                      kernel_shape=[3, 3], strides=[stride, stride]))
        inits.extend(bn_params(f"{name}.bn", cout, rng))
        nodes.append(helper.make_node("BatchNormalization", [f"{name}.y"] + [f"{name}.bn.{p}" for p in
                                      ("gamma", "beta", "mean", "var")], [f"{name}.b"], name=f"{name}.bn"))
        nodes.append(helper.make_node("Relu", [f"{name}.b"], [f"{name}.r"], name=f"{name}.relu"))
        return f"{name}.r"

    def fc(name, x, k, n, relu=True):
        init(f"{name}.w", rng.normal(0, (2 / k) ** 0.5, (n, k)))
        init(f"{name}.b", rng.normal(0, 0.1, n))
        nodes.append(helper.make_node("Gemm", [x, f"{name}.w", f"{name}.b"], [f"{name}.y"], name=name, transB=1))
        if not relu:
            return f"{name}.y"
        nodes.append(helper.make_node("Relu", [f"{name}.y"], [f"{name}.r"], name=f"{name}.relu"))
        return f"{name}.r"

    x = conv("conv0", "input", 3, 40)
    x = conv("conv1", x, 40, 70, stride=2, pads=(0, 1, 1, 0))
    x = conv("conv2", x, 70, 36)
    x = conv("conv3", x, 36, 16, stride=2)
    nodes.append(helper.make_node("Flatten", [x], ["flat"], name="flat", axis=1))
    x = fc("fc3", fc("fc2", fc("fc1", "flat", 16 * 3 * 3, 100), 100, 65), 65, 10, relu=False)
    graph = helper.make_graph(nodes, "chain_cnn",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 10, 10])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="qcompile-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.mark.skipif(not have_nvcc(), reason="nvcc (CUDA toolkit) not installed: gpu artifacts cannot be built here")
def test_artifact_chains_skip_pack_kernels_and_equal_fakequant(tmp_path, monkeypatch):
    from qcompile import api
    from qcompile.evaluate import predict
    from qcompile.runtime import InferenceSession
    from qcompile.runtime.gpu import GpuSession

    onnx.save(chain_cnn(), tmp_path / "chain.onnx")
    calib = np.random.default_rng(1).uniform(0, 1, (32, 3, 10, 10)).astype(np.float32)
    result = api.compile(tmp_path / "chain.onnx", config="w1a2", calib=calib, target="gpu:sm_90")
    out = tmp_path / "art"
    result.save(out)
    kernel_steps = {s["layer"]: s for s in result.manifest["schedule"] if s["kind"] == "kernel"}
    assert {k: s.get("packed_into") for k, s in kernel_steps.items()} == \
        {"conv1": "conv2", "conv2": "conv3", "conv3": None, "fc1": "fc2", "fc2": None}
    assert [k for k, s in kernel_steps.items() if s.get("packed_input")] == ["conv2", "conv3", "fc2"]
    why = {p["node"]: p["why"] for p in result.manifest["plan"]}
    assert "writes conv2's packed input (no pack kernel between them)" in why["conv1"]

    shutil.copytree(out / "kernels", tmp_path / "emu")       # the emulation is built beside, not in, the artifact
    so = build_emulation(tmp_path / "emu")
    monkeypatch.setenv("QCOMPILE_GPU_EMULATION", str(so))
    for path in ("mma", "popc"):
        monkeypatch.setenv("QCOMPILE_GPU_PATH", path)
        sess, gpu = InferenceSession(out), GpuSession(out, result.manifest)
        for batch in (1, 5):
            x = np.random.default_rng(batch).uniform(0, 1, (batch, 3, 10, 10)).astype(np.float32)
            want = predict(result.model, x)
            np.testing.assert_array_equal(sess.run(None, {"input": x})[0], want)
            np.testing.assert_array_equal(gpu.run(None, {"input": x})[0], want)
            log = [k for k in gpu.lib.launch_log if k != "memset"]
            packs = [k for k in log if k.endswith("_pack")]
            assert len(packs) == 2 and "conv1" in packs[0] and "fc1" in packs[1], log
            gemms = [k.split("_", 2)[2] for k in log if not k.endswith("_pack")]
            assert gemms == [f"conv1_{path}_packed", f"conv2_{path}_packed", f"conv3_{path}",
                             f"fc1_{path}_packed", f"fc2_{path}"], log
        with pytest.raises(RuntimeInputError, match="exists only as packed bit planes"):
            gpu.run([kernel_steps["conv1"]["outputs"][0]], {"input": x})


# ---------------------------------------------------------------------------------------------------- nvcc
MMA = "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc"


@nvcc_needed
def test_nvcc_compiles_the_chained_kernels_for_sm80_sm90(built):
    out, _ = built["nvcc"].communicate(timeout=900)
    assert built["nvcc"].returncode == 0, out[-2000:]
    layers = json.loads(built["manifest"].read_text())["layers"]
    for arch in ("80", "90"):
        ptx = (built["dir"] / "ptx" / f"qc_gpu.compute_{arch}.ptx").read_text()
        bodies = {m.group(1): m.group(2) for m in re.finditer(r"\.entry (\w+)\((.*?)(?=\.entry |\Z)", ptx, re.S)}
        for layer in layers:
            for role, name in layer["kernels"].items():
                assert name in bodies, f"{name} missing from the compute_{arch} PTX"
                if role.endswith("_packed"):   # the packed epilogue: one warp ballot per plane
                    assert "vote.sync.ballot.b32" in bodies[name], name
                    assert (MMA in bodies[name]) == role.startswith("mma"), name
