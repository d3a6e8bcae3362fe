"""Small hand-built ONNX graphs for pass tests (no torch, deterministic)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def bn_params(prefix, c, rng):
    return [
        _init(f"{prefix}.gamma", rng.uniform(0.5, 1.5, c)),
        _init(f"{prefix}.beta", rng.normal(0, 0.1, c)),
        _init(f"{prefix}.mean", rng.normal(0, 0.1, c)),
        _init(f"{prefix}.var", rng.uniform(0.5, 1.5, c)),
    ]


def tiny_cnn(seed: int = 0, opset: int = 17, c1: int = 8, c2: int = 16, c3: int = 16) -> onnx.ModelProto:
    """conv1-BN-ReLU, conv2-BN-ReLU-MaxPool, conv3(bias)-ReLU, Dropout, Flatten, fc1-BN-ReLU, Identity, fc2.

    Input [N,1,12,12] in [0,1]. Exercises BN folding, Dropout/Identity removal and first/last-float planning."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def conv(name, x, cin, cout, bias=False, stride=1):
        inits.append(_init(f"{name}.w", rng.normal(0, (2 / (cin * 9)) ** 0.5, (cout, cin, 3, 3))))
        ins = [x, f"{name}.w"]
        if bias:
            inits.append(_init(f"{name}.b", rng.normal(0, 0.1, cout)))
            ins.append(f"{name}.b")
        nodes.append(helper.make_node("Conv", ins, [f"{name}.y"], name=name, pads=[1, 1, 1, 1],
                                      kernel_shape=[3, 3], strides=[stride, stride]))
        return f"{name}.y"

    def bn(name, x, c):
        inits.extend(bn_params(name, c, rng))
        nodes.append(helper.make_node("BatchNormalization", [x] + [f"{name}.{p}" for p in
                                      ("gamma", "beta", "mean", "var")], [f"{name}.y"], name=name, epsilon=1e-5))
        return f"{name}.y"

    def relu(name, x):
        nodes.append(helper.make_node("Relu", [x], [f"{name}.y"], name=name))
        return f"{name}.y"

    x = relu("relu1", bn("bn1", conv("conv1", "input", 1, c1), c1))
    x = relu("relu2", bn("bn2", conv("conv2", x, c1, c2), c2))
    nodes.append(helper.make_node("MaxPool", [x], ["pool2.y"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]))
    x = relu("relu3", conv("conv3", "pool2.y", c2, c3, bias=True))
    nodes.append(helper.make_node("Dropout", [x], ["drop.y"], name="drop"))
    nodes.append(helper.make_node("Flatten", ["drop.y"], ["flat.y"], name="flat", axis=1))
    inits.append(_init("fc1.w", rng.normal(0, (2 / (c3 * 36)) ** 0.5, (32, c3 * 36))))
    inits.append(_init("fc1.b", rng.normal(0, 0.1, 32)))
    nodes.append(helper.make_node("Gemm", ["flat.y", "fc1.w", "fc1.b"], ["fc1.y"], name="fc1", transB=1))
    x = relu("relu4", bn("bn4", "fc1.y", 32))
    nodes.append(helper.make_node("Identity", [x], ["id.y"], name="id"))
    inits.append(_init("fc2.w", rng.normal(0, 0.3, (10, 32))))
    inits.append(_init("fc2.b", np.zeros(10)))
    nodes.append(helper.make_node("Gemm", ["id.y", "fc2.w", "fc2.b"], ["logits"], name="fc2", transB=1))
    graph = helper.make_graph(
        nodes, "tiny_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 12, 12])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="qcompile-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def tiny_inputs(n: int = 16, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, 1, 12, 12)).astype(np.float32)


def gemm_stack(prev: str, dims, gain: float, activations, rng):
    """Gemm layers fc0..fc{L-1} of sizes dims (transB=1, random weights and biases), activation i after fc i:
    (initializers, nodes, name of the last output)."""
    inits, nodes = [], []
    for i in range(len(dims) - 1):
        inits += [numpy_helper.from_array(rng.normal(0, (gain / dims[i]) ** 0.5, (dims[i + 1], dims[i]))
                                          .astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.normal(0, 0.1, dims[i + 1]).astype(np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"g{i}"], transB=1, name=f"fc{i}"))
        prev = f"g{i}"
        if i < len(activations):
            op, kw = activations[i]
            nodes.append(helper.make_node(op, [prev], [f"a{i}"], name=f"act{i}", **kw))
            prev = f"a{i}"
    return inits, nodes, prev


def signed_mlp(path):
    """x [N,16] -> fc0 -> Tanh -> fc1 -> LeakyRelu -> fc2 -> Tanh -> fc3: fc1 and fc2 read signed inputs."""
    acts = [("Tanh", {}), ("LeakyRelu", {"alpha": 0.1}), ("Tanh", {})]
    inits, nodes, prev = gemm_stack("x", [16, 64, 64, 64, 10], 1.5, acts, np.random.default_rng(0))
    graph = helper.make_graph(nodes, "signed_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def signed_convnet(path):
    """conv0 3x3 (float) -> Tanh -> conv1 1x1 (signed input, no pads) -> Tanh -> conv2 3x3 pad 1 (signed, padded)
    -> Relu -> GlobalAveragePool -> Flatten -> fc."""
    rng = np.random.default_rng(1)
    w = lambda *s: numpy_helper.from_array(rng.normal(0, (1.0 / np.prod(s[1:])) ** 0.5, s).astype(np.float32))  # noqa
    inits = [w(8, 3, 3, 3), w(16, 8, 1, 1), w(16, 16, 3, 3), w(10, 16)]
    for t, n in zip(inits, ("w0", "w1", "w2", "w3")):
        t.name = n
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Tanh", ["c0"], ["t0"], name="tanh0"),
             helper.make_node("Conv", ["t0", "w1"], ["c1"], name="conv1", kernel_shape=[1, 1]),
             helper.make_node("Tanh", ["c1"], ["t1"], name="tanh1"),
             helper.make_node("Conv", ["t1", "w2"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p2"], name="gap"),
             helper.make_node("Flatten", ["p2"], ["f2"], name="flat"),
             helper.make_node("Gemm", ["f2", "w3"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "signed_conv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 10, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path
