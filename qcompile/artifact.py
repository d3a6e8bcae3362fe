"""Lower a fake-quant model to a deployable artifact folder for a target.

    manifest.json   schema, source sha256, config, target + capabilities, per-layer plan, every file's sha256,
                    input/output signature, and the schedule the runtime follows
    graph.onnx      the fused graph (ai.qcompile BitConv/BitGemm nodes + standard ops), for people and tools
    fakequant.onnx  the fake-quant model (onnxruntime runs it; the artifact's outputs equal its outputs)
    partitions/     onnxruntime sub-models of the float/glue parts, in schedule order
    kernels/        generated C sources and the built shared library
    report.json/.md, weights.png
"""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

import qcompile
from qcompile.errors import ConfigError, QuantizationError
from qcompile.fileio import sha256_file
from qcompile.input_quant import fold_input_quantizers
from qcompile.partition import check_loads, disabled_optimizers, partition, reader_counts
from qcompile.passes.fuse import DOMAIN, FuseBitKernels
from qcompile.targets.cpu.profile import cpu_path, machine_profile
from qcompile.passes.quantize import core_name

SCHEMA = "qcompile.artifact"
SCHEMA_VERSION = 1
TARGETS = ("cpu", "cpu:avx2", "cpu:generic")
GPU_TARGETS = ("gpu", "gpu:sm_80", "gpu:sm_90")  # any gpu:sm_XY (XY >= 75) works; these are the listed ones


def get_target(name: str):
    if name == "fpga" or name.startswith("fpga:"):  # fpga:<part>; the part's budget is the target's "caps"
        from qcompile.targets.fpga.parts import get_part
        return get_part(name.split(":", 1)[1] if ":" in name else "xc7z020")
    if name.startswith("gpu"):
        from qcompile.targets.gpu.caps import detect as gpu_detect
        return gpu_detect(name)
    if name not in TARGETS:
        raise ConfigError(f"unknown target '{name}'; available: {', '.join(TARGETS + GPU_TARGETS)} or gpu:sm_<arch>, fpga or fpga:<part>")
    from qcompile.targets.cpu import caps as cpu_caps
    return cpu_caps.detect(name)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def layer_specs(fused: onnx.ModelProto, fakequant: onnx.ModelProto, *, fold_pools: bool = False):
    """One LayerSpec per ai.qcompile node; per-sample input shapes come from the fake-quant model.

    ``fold_pools``: a MaxPoolCodes whose window equals its strides (no dilation) and that alone reads a BitConv's
    codes is folded into that conv's spec (``LayerSpec.pool``) instead of getting its own; the spec's ``extra``
    then names the pool node and the value it writes (``pool_node``, ``output``)."""
    from qcompile.targets.cpu.spec import LayerSpec

    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in onnx.shape_inference.infer_shapes(fakequant).graph.value_info}
    core_input = {n.name: n.input[0] for n in fakequant.graph.node if n.input}
    inits = {i.name: numpy_helper.to_array(i) for i in fused.graph.initializer}
    readers = reader_counts(fused.graph)
    graph_outputs = {o.name for o in fused.graph.output}
    specs, produced = [], {}  # output value -> (spec that writes it, bits of its codes)
    for node in fused.graph.node:
        if node.domain != DOMAIN:
            continue
        if node.op_type == "MaxPoolCodes":  # reads the codes of the kernel step before it
            src, bits = produced[node.input[0]]
            kernel, strides = _attr(node, "kernel_shape"), _attr(node, "strides", [1, 1])
            if (fold_pools and src.op == "conv" and src.pool is None and list(kernel) == list(strides)
                    and list(_attr(node, "dilations", [1, 1])) == [1, 1] and readers.get(node.input[0]) == 1
                    and node.input[0] not in graph_outputs):
                folded = src.replace(pool=tuple(kernel),
                                     extra={**src.extra, "pool_node": node.name, "output": node.output[0]})
                specs[next(i for i, s in enumerate(specs) if s is src)] = folded
                produced[node.output[0]] = (folded, bits)
                continue
            specs.append(LayerSpec.maxpool(node.name, src.out_shape, _attr(node, "kernel_shape"),
                                           _attr(node, "strides", [1, 1]), _attr(node, "dilations", [1, 1]),
                                           bits=bits))
            produced[node.output[0]] = (specs[-1], bits)
            continue
        arrays = [inits.get(name) if name else None for name in list(node.input) + [""] * (6 - len(node.input))]
        _, w, wzero2, mult, bias, thr = arrays[:6]
        attrs = {a.name: _attr(node, a.name) for a in node.attribute}
        attrs["epilogue"] = attrs["epilogue"].decode() if isinstance(attrs["epilogue"], bytes) else attrs["epilogue"]
        in_shape = shapes[core_input[core_name(node.name)]][1:]
        lead = ()
        if node.op_type == "BitGemm" and len(in_shape) > 1:  # [batch, seq, ..., K]: every row is independent,
            lead, in_shape = tuple(in_shape[:-1]), in_shape[-1:]  # the kernel sees [batch * seq, K]
        specs.append(LayerSpec.from_node(node.name, node.op_type, attrs, w, wzero2, in_shape=in_shape,
                                         mult=mult, bias=bias, thresholds=thr))
        if lead:
            specs[-1] = specs[-1].replace(extra={**specs[-1].extra, "lead_shape": lead})
        produced[node.output[0]] = (specs[-1], int(attrs.get("bits_out") or 8))
    return specs


def symbolic_layers(fakequant: onnx.ModelProto, layers) -> dict[str, str]:
    """Quantized layers whose input has a symbolic size the kernel cannot take at run time -> why they stay on
    onnxruntime. Conv kernels are generated for fixed channels and spatial sizes; a MatMul/Gemm kernel takes any
    number of rows, so only its last (K) size must be fixed. Such a layer keeps its fake-quant form (same outputs)."""
    inferred = onnx.shape_inference.infer_shapes(fakequant)
    dims = {vi.name: vi.type.tensor_type.shape.dim for vi in
            [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    core_input = {n.name: n.input[0] for n in fakequant.graph.node if n.input}
    out = {}
    for name, layer in layers.items():
        shape = dims.get(core_input.get(core_name(name), ""))
        if shape is None or len(shape) < 2:  # no shape at all (e.g. after an op shape inference does not know)
            out[name] = "its input shape is unknown after shape inference; kept as fake-quant on onnxruntime"
            continue
        sizes = [str(d.dim_value) if d.HasField("dim_value") else
                 (d.dim_param if d.dim_param and not d.dim_param.startswith("unk__") else "?") for d in shape]
        fixed = list(shape)[-1:] if getattr(layer, "op", "") in ("MatMul", "Gemm") else list(shape)[1:]
        if any(not d.HasField("dim_value") for d in fixed):
            out[name] = (f"input shape [batch, {', '.join(sizes[1:])}] has symbolic sizes and bit kernels are built "
                         "for fixed sizes; kept as fake-quant on onnxruntime (any size runs; calibrate with inputs "
                         "of the deployed size to get kernels for it)")
    return out


def specialize_shapes(fakequant: onnx.ModelProto, batch: dict | None,
                     layers) -> tuple[onnx.ModelProto, dict, dict[str, str]]:
    """The fake-quant model with the fewest symbolic input sizes fixed to the calibration batch's that give every
    layer it can a fixed-shape kernel (first axes stay free; so do other free sizes no kernel needs, such as a
    sequence length or a recurrent state's batch axis); {input: per-sample shape, None where free} of what was
    fixed ({} when nothing was); and that model's symbolic_layers. The artifact runs these shapes on its kernels
    and any other on the fake-quant model."""
    unfixed = symbolic_layers(fakequant, layers)
    free = {}
    for vi in fakequant.graph.input if batch and unfixed else ():
        dims, arr = list(vi.type.tensor_type.shape.dim), batch.get(vi.name)
        if arr is None or len(dims) != np.ndim(arr) or len(dims) < 2:
            continue
        free.update({(vi.name, axis): int(np.shape(arr)[axis]) for axis in range(1, len(dims))
                     if not dims[axis].HasField("dim_value")})
    best = _with_sizes(fakequant, free) if free else None
    if best is None:
        return fakequant, {}, unfixed
    symbolic = symbolic_layers(best, layers)
    if len(symbolic) == len(unfixed):
        return fakequant, {}, unfixed     # fixing sizes gains no kernel
    keep = dict(free)
    for key in free:                      # leave free every size no kernel needs
        trial = {k: v for k, v in keep.items() if k != key}
        model = _with_sizes(fakequant, trial)
        if model is not None and symbolic_layers(model, layers).keys() == symbolic.keys():
            keep, best = trial, model
    shapes = {}
    for (name, axis), size in keep.items():
        rank = next(len(vi.type.tensor_type.shape.dim) for vi in fakequant.graph.input if vi.name == name)
        shapes.setdefault(name, [None] * (rank - 1))[axis - 1] = size
    return best, shapes, symbolic


def _with_sizes(fakequant: onnx.ModelProto, sizes: dict) -> onnx.ModelProto | None:
    """A copy with input sizes {(input, axis): size} fixed and shapes inferred again; None if inference fails."""
    model = onnx.ModelProto()
    model.CopyFrom(fakequant)
    for vi in model.graph.input:
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if (vi.name, axis) in sizes:
                d.dim_value = sizes[(vi.name, axis)]   # assigning the value clears the oneof's dim_param
    del model.graph.value_info[:]
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception:  # noqa: BLE001 - sizes only onnxruntime can work out: stay generic (fake-quant layers)
        return None


def custom_op_node(spec, fused_node: onnx.NodeProto) -> onnx.NodeProto:
    """The deployable graph's node for one kernel layer: op Kernel_<in>_<out> of ai.qcompile, the layer named by an
    attribute; the weights live in the library (targets/cpu/templates/ort_ops.c)."""
    tag = {"float32": "f32", "uint8": "u8", "int32": "i32"}
    op = f"Kernel_{'f32' if spec.in_thresholds is not None else 'u8'}_{tag[str(spec.out_dtype)]}"
    return helper.make_node(op, [fused_node.input[0]], [fused_node.output[0]], name=spec.name, domain=DOMAIN,
                            layer=spec.name)


def kernel_output_types(fused: onnx.ModelProto, specs) -> dict[str, onnx.TypeProto]:
    """The types of the values that may cross a schedule step: the graph inputs and every kernel layer's output."""
    types = {i.name: i.type for i in fused.graph.input}
    elems = {"float": onnx.TensorProto.FLOAT, "threshold": onnx.TensorProto.UINT8, "none": onnx.TensorProto.INT32}
    for spec in specs:
        out_name = spec.extra.get("output") or \
            next(n.output[0] for n in fused.graph.node if n.name == spec.name and n.domain == DOMAIN)
        elem = onnx.TensorProto.UINT8 if spec.op == "maxpool" else elems[spec.epilogue]
        lead = tuple(d or None for d in spec.extra.get("lead_shape", ()))  # 0: a symbolic size (sequence length)
        types[out_name] = _tensor_type(elem, (*lead, *spec.out_shape))
    return types


@dataclass
class FusedGraph:
    """A fake-quant model with every fixed-size quantized layer fused into a bit-kernel node (targets that run all of
    them, gpu and fpga: no planner)."""

    calib_batch: dict | None      # the first calibration batch (its sizes fix symbolic ones)
    model: onnx.ModelProto        # the fake-quant model, shapes specialized
    specialized: bool
    symbolic: dict                # layers left on onnxruntime for a symbolic size -> why
    fused: onnx.ModelProto        # the fused graph
    graph: onnx.ModelProto        # the fused graph with float input quantizers folded into their kernels
    specs: list                   # one LayerSpec per kernel node


def fuse_fixed_size_layers(result) -> FusedGraph:
    calib_batch = _first_calibration_batch(result.ctx.calib)
    model, specialized, symbolic = specialize_shapes(result.model, calib_batch, result.ctx.layers)
    result.ctx.fuse_notes = {}
    fused_ir = ir.from_proto(model)
    FuseBitKernels(set(result.ctx.layers) - set(symbolic))(fused_ir, result.ctx)
    fused = ir.to_proto(fused_ir)
    graph, specs = fold_input_quantizers(fused, layer_specs(fused, model, fold_pools=True), DOMAIN)
    return FusedGraph(calib_batch, model, specialized, symbolic, fused, graph, specs)


def compile_recurrent(model: onnx.ModelProto, layers) -> onnx.ModelProto:
    """``model`` with each recurrent layer's Scan-form nodes replaced by one ``Recurrent`` node of ai.qcompile (its
    time loop in the kernel library, templates/layer_rnn.c), where the first of them stood. Every output gets a name
    (an unused one a placeholder), so the custom op never sees an absent output."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for layer in layers:
        drop = set(layer.nodes)
        nodes = list(out.graph.node)
        at = next(i for i, n in enumerate(nodes) if n.name in drop)
        ins = [layer.inputs.get(k, "") for k in ("x", "seq_lens", "h0", "c0")]
        while ins[-1] == "":
            ins.pop()
        keys = ("y", "y_h", "y_c") if layer.cell == "LSTM" else ("y", "y_h")
        outs = [layer.outputs.get(k) or f"{layer.name}/unused_{k}" for k in keys]
        node = helper.make_node("Recurrent", ins, outs, name=layer.name, domain=DOMAIN, layer=layer.name)
        kept = [n for n in nodes if n.name not in drop]
        kept.insert(sum(1 for n in nodes[:at] if n.name not in drop), node)
        del out.graph.node[:]
        out.graph.node.extend(kept)
    return out


def recurrent_types(model: onnx.ModelProto, layers) -> dict[str, onnx.TypeProto]:
    """The types of the recurrent layers' outputs (they cross into onnxruntime steps): the model's inferred ones, else
    [seq, dirs, batch, hidden] / [dirs, batch, hidden] with symbolic seq and batch."""
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {v.name: v.type for v in [*inferred.graph.value_info, *inferred.graph.output]}
    types = {}
    for layer in layers:
        for key, shape in (("y", ["seq", layer.num_directions, "batch", layer.hidden]),
                           ("y_h", [layer.num_directions, "batch", layer.hidden]),
                           ("y_c", [layer.num_directions, "batch", layer.hidden])):
            name = layer.outputs.get(key)
            if name:
                types[name] = known.get(name) or helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, shape)
    return types


def deploy_model(fused: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
    """One graph for one onnxruntime session: the float and int8 nodes as they are, each kernel layer a custom-op
    node; only the initializers those nodes read (the bit layers' weights are in the library)."""
    from qcompile.partition import node_reads

    read = {name for n in nodes for name in node_reads(n)}
    graph = helper.make_graph(nodes, fused.graph.name or "qcompile", list(fused.graph.input), list(fused.graph.output),
                              [i for i in fused.graph.initializer if i.name in read])
    opsets = [o for o in fused.opset_import if o.domain != DOMAIN] + [helper.make_opsetid(DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="qcompile")
    model.ir_version = fused.ir_version
    return model


def _tensor_type(elem: int, shape) -> onnx.TypeProto:
    return helper.make_tensor_type_proto(elem, ["batch", *shape])


@dataclass
class Lowered:
    """A compiled artifact, built in a temporary folder until saved."""

    workdir: Path
    manifest: dict

    def copy_into(self, dest: Path) -> None:
        for item in self.workdir.iterdir():
            target = dest / item.name
            if item.is_dir():
                shutil.copytree(item, target)
            else:
                shutil.copy2(item, target)


def lower(result, target_name: str, *, autotune: bool = False, batch: int = 64,
          kernel: str | None = None, options: dict | None = None) -> Lowered:
    """Plan each layer's kernel, fuse/lower, generate and build kernels, partition the rest, write a manifest.

    Everything is built in a temporary folder, removed on failure and when the Lowered object goes away."""
    from qcompile import planner

    caps = get_target(target_name)
    if kernel is not None and kernel not in planner.KERNELS:
        raise ConfigError(f"unknown kernel '{kernel}'; choose one of {', '.join(planner.KERNELS)}")
    work = Path(tempfile.mkdtemp(prefix="qcompile-artifact-"))
    try:
        if target_name.startswith("fpga"):  # options: fps, utilization (targets/fpga/folding.py)
            from qcompile.targets.fpga.project import build_fpga_artifact
            manifest = build_fpga_artifact(result, target_name, caps, work, **(options or {}))
        elif target_name.startswith("gpu"):
            from qcompile.targets.gpu.lower import build_gpu_artifact
            manifest = build_gpu_artifact(result, target_name, caps, work)
        else:
            manifest = _build(result, target_name, caps, work, autotune=autotune, batch=batch, kernel=kernel)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    lowered = Lowered(work, manifest)
    weakref.finalize(lowered, shutil.rmtree, work, True)
    return lowered


def _build(result, target_name: str, caps, work: Path, *, autotune: bool, batch: int, kernel: str | None) -> dict:
    from qcompile import planner
    from qcompile.passes.int8 import LowerToInt8
    from qcompile.runtime.kernels import Library
    from qcompile.targets.cpu.build import build_library

    (work / "kernels").mkdir()
    (work / "partitions").mkdir()

    calib_batch = _first_calibration_batch(result.ctx.calib)
    model, specialized, symbolic = specialize_shapes(result.model, calib_batch, result.ctx.layers)
    candidates = ir.from_proto(model)                   # every fixed-size quantized layer as a bit kernel
    FuseBitKernels(set(result.ctx.layers) - set(symbolic))(candidates, result.ctx)
    all_specs = layer_specs(ir.to_proto(candidates), model)
    measured = None
    if autotune and all_specs:
        probe = build_library(all_specs, work / "autotune", layer_avx512=caps.avx512_vpopcntdq)
        with cpu_path(caps.path):
            measured = planner.measure([s for s in all_specs if s.op != "maxpool"], Library(probe), batch)
        shutil.rmtree(work / "autotune")
    # the cost model runs on this CPU's measured speeds (one micro-benchmark per machine, cached); a forced kernel
    # needs no prediction but the report still shows one, from the design constants
    profile = machine_profile(caps) if kernel is None and any(s.op != "maxpool" for s in all_specs) else None
    choices = planner.choose([s for s in all_specs if s.op != "maxpool"], caps, batch, measured, force=kernel,
                             profile=profile)
    result.ctx.fuse_notes = {}

    fused_ir = ir.from_proto(model)
    FuseBitKernels({n for n, c in choices.items() if c.kernel == "bitserial"})(fused_ir, result.ctx)
    LowerToInt8({n for n, c in choices.items() if c.kernel == "int8"})(fused_ir, result.ctx)
    fused = ir.to_proto(fused_ir)
    specs = layer_specs(fused, model, fold_pools=True)
    # the float layer before a BitConv hands it floats: the conv quantizes them itself (qcompile.input_quant)
    to_partition, specs = fold_input_quantizers(fused, specs, DOMAIN)
    from qcompile.targets.cpu.recurrent import recurrent_layers
    try:
        rnn = recurrent_layers(result.model)
        rnn_reason = None
    except QuantizationError as exc:  # e.g. a fake-quant model from an older qcompile: its Scan form runs as it is
        rnn, rnn_reason = [], str(exc)
    if rnn:
        to_partition = compile_recurrent(to_partition, rnn)
    # the "cpu" target's library carries the AVX-512 BitGemm kernels whatever the build machine has: the path is
    # picked at run time, and an artifact built on an AVX2 box may be deployed on an AVX-512 server
    library = build_library(specs, work / "kernels", layer_avx512=caps.avx512_vpopcntdq or caps.name == "cpu",
                            recurrent=rnn) if specs or rnn else None
    for leftover in (work / "kernels").glob("*.o"):
        leftover.unlink()

    types = kernel_output_types(fused, specs)
    types.update(recurrent_types(model, rnn))
    rnn_names = {r.name for r in rnn}
    schedule, deploy_nodes, kernel_node = [], [], {}
    folded = {s.extra["pool_node"]: s.name for s in specs if "pool_node" in s.extra}
    spec_by_name = {s.name: s for s in specs}
    for index, step in enumerate(partition(to_partition, types)):
        if step.kind == "kernel" and step.layer in rnn_names:  # a recurrent layer: its time loop in the library
            deploy_nodes.append(step.nodes[0])
            schedule.append({"kind": "kernel", "layer": step.layer, "recurrent": True,
                             "library": f"kernels/{library.name}", "inputs": step.inputs, "outputs": step.outputs})
        elif step.kind == "kernel" and step.layer in folded:  # its conv's kernel step writes the pooled codes
            next(e for e in schedule if e.get("layer") == folded[step.layer])["outputs"] = step.outputs
            kernel_node[folded[step.layer]].output[0] = step.nodes[0].output[0]
        elif step.kind == "kernel":
            kernel_node[step.layer] = custom_op_node(spec_by_name[step.layer], step.nodes[0])
            deploy_nodes.append(kernel_node[step.layer])
            entry = {"kind": "kernel", "layer": step.layer, "library": f"kernels/{library.name}",
                     "inputs": step.inputs[:1], "outputs": step.outputs}
            lead = spec_by_name[step.layer].extra.get("lead_shape")
            if lead:  # a BitGemm over [batch, *lead, K]: every leading axis is rows (the custom op reshapes none)
                entry["rows"] = list(lead)
            schedule.append(entry)
        else:
            rel = f"partitions/p{index:02d}.onnx"
            onnx.save(step.model, work / rel)
            schedule.append({"kind": "onnxruntime", "model": rel, "inputs": step.inputs, "outputs": step.outputs})
            deploy_nodes.extend(step.nodes)
    deploy = deploy_model(to_partition, deploy_nodes)
    check_loads(deploy, "deployable graph deploy.onnx", library)
    # NCHWc: probed once, on the one session the runtime makes (outputs must stay bitwise the same)
    deploy_disabled = disabled_optimizers(deploy, calib_batch, library=library)
    onnx.save(deploy, work / "deploy.onnx")
    onnx.save(fused, work / "graph.onnx")
    onnx.save(result.model, work / "fakequant.onnx")

    def signature(values):
        return [{"name": v.name, "dtype": _dtype_name(v.type.tensor_type.elem_type),
                 "shape": [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                           for d in v.type.tensor_type.shape.dim]} for v in values]

    kernel_names = {"bitserial": f"bitserial-{caps.path}", "int8": "onnxruntime-int8",
                    "float": "onnxruntime-fp32 (fake-quant)"}
    plan, spec_of = [], {s.name: s for s in specs}
    for name, p in result.ctx.plan.items():
        choice = choices.get(name)
        label = kernel_names[choice.kernel] if choice else "onnxruntime-fp32"
        if choice and choice.kernel == "bitserial" and name in spec_of and planner.lut_kernel(spec_of[name], caps):
            label = "lut-avx2"  # the AVX2 LUT kernels, on the AVX-512 path too
        why = (result.ctx.fuse_notes.get(name, "") + "; " + choice.why) if choice else symbolic.get(name, p.reason)
        if p.quantize and p.op in ("LSTM", "GRU") and name in rnn_names:
            label = f"bitserial-{caps.path} (time loop)"
            why = ("recurrent layer: one library call per sequence; W x_t of every step in one BitGemm, R h_t-1 one "
                   "BitGemm per step, gate arithmetic in C (exact against the fake-quant Scan in its integer parts)")
        elif p.quantize and p.op in ("LSTM", "GRU"):
            label = "onnxruntime-fp32 (fake-quant Scan)"
            why = f"recurrent layer: its quantized Scan form runs in onnxruntime ({rnn_reason or 'not compiled'})"
        spec = spec_of.get(name)
        if spec is not None and spec.pool is not None:
            why += f"; its {spec.pool[0]}x{spec.pool[1]} MaxPool runs inside this kernel"
        if spec is not None and spec.in_thresholds is not None:
            why += "; quantizes its float input itself (the Clip -> QuantizeLinear before it folded in)"
        entry = {"node": name, "op": p.op, "bits": f"W{p.bits_w}A{p.bits_a}" if p.quantize else "float",
                 "kernel": label, "why": why}
        if choice:
            entry["estimate_ms"] = {k: round(v, 4) for k, v in choice.estimate_ms.items()}
            entry["measured_ms"] = {k: round(v, 4) for k, v in choice.measured_ms.items()}
        plan.append(entry)
    manifest = {
        **manifest_header(result, {"name": target_name, "caps": caps.__dict__ if hasattr(caps, "__dict__") else str(caps),
                                   "plan_batch": batch, "autotuned": bool(measured),
                                   "cost_model": "this CPU's measured profile" if profile is not None
                                   else "design constants"}),
        "inputs": signature(fused.graph.input), "outputs": signature(fused.graph.output),
        # other input shapes than the kernels were built for run the fake-quant model (same integer arithmetic)
        "generic": {"model": "fakequant.onnx", "inputs": signature(result.model.graph.input)} if specialized else None,
        "plan": plan, "schedule": schedule,
        # how the artifact runs: one onnxruntime session of deploy.onnx with the library's custom ops registered
        "deploy": {"model": "deploy.onnx", "library": f"kernels/{library.name}" if library else None,
                   "domain": DOMAIN, "disabled_optimizers": deploy_disabled},
        "files": {str(p.relative_to(work)): sha256_file(p) for p in sorted(work.rglob("*")) if p.is_file()},
    }
    return manifest


def manifest_header(result, target: dict) -> dict:
    """What every target's manifest starts with: schema, qcompile version, the source and its sha256, the config,
    and ``target`` (name, capabilities, how the plan was made)."""
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "qcompile_version": qcompile.__version__,
            "source": {"path": str(result.source), "sha256": result.report.get("source_sha256")},
            "config": result.config.to_dict(), "target": target}


def _first_calibration_batch(reader) -> dict | None:
    """One calibration batch (the reader is rewound before and after), or None when the reader cannot rewind."""
    if reader is None or not hasattr(reader, "rewind"):
        return None
    reader.rewind()
    batch = reader.get_next()
    reader.rewind()
    return batch


def _dtype_name(elem: int) -> str:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem)).name


def write_manifest(dest: Path, manifest: dict) -> None:
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))


def pack(artifact: str | Path, out: str | Path, *, strip: bool = True) -> dict:
    """Write into `out` only what a device runs: manifest.json, deploy.onnx, the kernel library (symbols a loader
    does not need stripped when `strip` and binutils' strip are there) and, when the kernels were built for fixed
    sizes of symbolic inputs, fakequant.onnx for the other sizes. The float and fake-quant models, the graph, the
    partitions, the C sources and the report stay in the build folder. Returns the new manifest."""
    import subprocess

    from qcompile.errors import ArtifactError
    from qcompile.fileio import atomic_dir

    src = Path(artifact)
    try:
        manifest = json.loads((src / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{src}: not a qcompile artifact folder ({exc})") from None
    deploy = manifest.get("deploy")
    if not deploy:
        raise ArtifactError(f"{src}: the manifest has no deployable graph (an older qcompile); recompile the model")
    keep = [deploy["model"]] + ([deploy["library"]] if deploy.get("library") else []) + \
        ([manifest["generic"]["model"]] if manifest.get("generic") else [])
    for rel in keep:
        if not (src / rel).is_file() or sha256_file(src / rel) != manifest["files"].get(rel):
            raise ArtifactError(f"{src / rel}: missing or not the file the manifest lists; recompile the model")
    with atomic_dir(out, (src / "manifest.json",)) as tmp:
        for rel in keep:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, tmp / rel)
        lib = deploy.get("library")
        if strip and lib and shutil.which("strip"):
            subprocess.run(["strip", "--strip-unneeded", str(tmp / lib)], check=False, capture_output=True)
        manifest = {**manifest, "files": {rel: sha256_file(tmp / rel) for rel in keep}, "packed_from": str(src)}
        write_manifest(tmp, manifest)
    return manifest
