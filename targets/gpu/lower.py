"""Lower a fake-quant model to a gpu artifact: every fixed-size quantized layer a GPU bit kernel, the float
remainder onnxruntime partitions, one schedule the runtime (qcompile.runtime.gpu.GpuSession) follows.

The folder has the same manifest schema as a cpu artifact; ``target.name`` starts with ``gpu`` and ``gpu.kernels``
names the kernel manifest (kernels/qc_gpu.json: the fatbin and the packed constants, each with its sha256, are also
in the artifact's ``files``). There is no ``deploy.onnx``: the kernels are launched through the CUDA driver, not
registered in onnxruntime.

A kernel step whose threshold codes only the next bit kernel reads (``chained_layers``) writes that kernel's
packed input from its epilogue (``packed_into`` / ``packed_input`` in the schedule; targets/gpu/chain.py).
"""

from __future__ import annotations

from pathlib import Path

import onnx

from qcompile.fileio import sha256_file
from qcompile.partition import partition

from .build import build_gpu_library
from .chain import chain_refusal

KERNEL_LABEL = "bitserial-gpu"


def build_gpu_artifact(result, target_name: str, caps, work: Path) -> dict:
    from qcompile import artifact as art

    (work / "kernels").mkdir()
    (work / "partitions").mkdir()
    g = art.fuse_fixed_size_layers(result)
    specialized, symbolic, fused, to_partition, specs = g.specialized, g.symbolic, g.fused, g.graph, g.specs
    types = art.kernel_output_types(fused, specs)
    schedule = []
    folded = {s.extra["pool_node"]: s.name for s in specs if "pool_node" in s.extra}
    spec_by_name = {s.name: s for s in specs}
    for index, step in enumerate(partition(to_partition, types)):
        if step.kind == "kernel" and step.layer in folded:   # the conv's kernel step writes the pooled codes
            next(e for e in schedule if e.get("layer") == folded[step.layer])["outputs"] = step.outputs
        elif step.kind == "kernel":
            entry = {"kind": "kernel", "layer": step.layer, "inputs": step.inputs[:1], "outputs": step.outputs}
            lead = spec_by_name[step.layer].extra.get("lead_shape")
            if lead:
                entry["rows"] = list(lead)
            schedule.append(entry)
        else:
            rel = f"partitions/p{index:02d}.onnx"
            onnx.save(step.model, work / rel)
            schedule.append({"kind": "onnxruntime", "model": rel, "inputs": step.inputs, "outputs": step.outputs})
    chains = chained_layers(schedule, spec_by_name, {o.name for o in fused.graph.output})
    kernels = build_gpu_library(specs, work / "kernels", archs=caps.archs, chains=chains) if specs else None
    onnx.save(fused, work / "graph.onnx")
    onnx.save(result.model, work / "fakequant.onnx")

    def signature(values):
        return [{"name": v.name, "dtype": art._dtype_name(v.type.tensor_type.elem_type),
                 "shape": [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                           for d in v.type.tensor_type.shape.dim]} for v in values]

    plan, spec_of = [], {s.name: s for s in specs}
    for name, p in result.ctx.plan.items():
        spec = spec_of.get(name)
        if spec is not None:
            label = KERNEL_LABEL
            why = (result.ctx.fuse_notes.get(name, "") + "; " if result.ctx.fuse_notes.get(name) else "") + \
                "b1 tensor-core MMA (AND + popc) on sm_80+, __popc on sm_75"
            if spec.pool is not None:
                why += f"; its {spec.pool[0]}x{spec.pool[1]} MaxPool runs on the GPU after it"
            if spec.in_thresholds is not None:
                why += "; quantizes its float input on the GPU"
            if name in chains:
                why += f"; its epilogue writes {chains[name]}'s packed input (no pack kernel between them)"
        else:
            label = "onnxruntime-fp32"
            why = symbolic.get(name, p.reason)
        plan.append({"node": name, "op": p.op, "bits": f"W{p.bits_w}A{p.bits_a}" if p.quantize else "float",
                     "kernel": label, "why": why})
    return {
        **art.manifest_header(result, {"name": target_name, "caps": caps.__dict__, "plan_batch": None,
                                       "autotuned": False,
                                       "cost_model": "none: every fixed-size quantized layer runs on the GPU"}),
        "inputs": signature(fused.graph.input), "outputs": signature(fused.graph.output),
        "generic": {"model": "fakequant.onnx", "inputs": signature(result.model.graph.input)} if specialized else None,
        "plan": plan, "schedule": schedule,
        "gpu": {"kernels": f"kernels/{kernels.name}" if kernels else None},
        "deploy": None,
        "files": {str(p.relative_to(work)): sha256_file(p) for p in sorted(work.rglob("*")) if p.is_file()},
    }


def chained_layers(schedule: list[dict], specs: dict, graph_outputs: set[str]) -> dict[str, str]:
    """{producer: consumer} for every kernel step whose output only the next bit kernel reads (not a float
    partition, not the caller) and that chain.chain_refusal accepts; marks both steps in ``schedule``."""
    readers: dict[str, list[dict]] = {}
    for entry in schedule:
        for name in entry["inputs"]:
            readers.setdefault(name, []).append(entry)
    chains = {}
    for entry in schedule:
        if entry["kind"] != "kernel" or entry["outputs"][0] in graph_outputs:
            continue
        reads = readers.get(entry["outputs"][0], [])
        if len(reads) != 1 or reads[0]["kind"] != "kernel" or reads[0].get("rows") != entry.get("rows"):
            continue
        consumer = reads[0]
        if chain_refusal(specs[entry["layer"]], specs[consumer["layer"]]) is None:
            chains[entry["layer"]] = consumer["layer"]
            entry["packed_into"], consumer["packed_input"] = consumer["layer"], True
    return chains
