"""One int8 MatMul (+ bias), three ways, side by side: ONNX Runtime's per-tensor recipe, the per-row recipe in
ONNX Runtime's operators, and embfast's fused RowQuantMatMul (issue 14).

python benchmarks/bench_rowquant_op.py --rows 1024 --threads 2 --repeat 30

Each way is built by the code that builds the model variants, from the same one-node float graph
(x @ W + b, W of all-MiniLM-L6-v2's shapes with seeded random values): ``quantize_dynamic`` (the ``dynamic``
variant's recipe; DynamicQuantizeMatMul), :func:`embfast.rowquant.quantize_rows` (MatMulIntegerToFloat and
its row-wise element-wise nodes) and :func:`embfast.rowquant.quantize_rows_fused`. Input: ``--rows`` tokens of
random activations. Runs alternate between the ways; medians of ``--repeat`` calls, in ms. The sessions do not
spin (``session.intra_op.allow_spinning`` 0), so no pool takes the cores from another.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--rows", type=int, default=1024)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--repeat", type=int, default=30)
p.add_argument("--shapes", nargs="*", default=["384x1152", "384x1536", "1536x384"], help="K x N of W")
ARGS = p.parse_args()


def float_graph(k: int, n: int, path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"], name="mm"), helper.make_node("Add", ["xw", "b"], ["y"])]
    graph = helper.make_graph(nodes, "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", n])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def main() -> None:
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from embfast import ortops
    from embfast.rowquant import quantize_rows, quantize_rows_fused

    tmp = Path(tempfile.mkdtemp())
    x_all = np.random.default_rng(1).standard_normal((ARGS.rows, 1536)).astype(np.float32)
    for shape in ARGS.shapes:
        k, n = (int(v) for v in shape.split("x"))
        src = tmp / f"f{k}x{n}.onnx"
        float_graph(k, n, src)
        paths = {"per tensor": tmp / f"d{k}x{n}.onnx", "per row, graph": tmp / f"g{k}x{n}.onnx",
                 "per row, fused": tmp / f"r{k}x{n}.onnx"}
        quantize_dynamic(str(src), str(paths["per tensor"]), weight_type=QuantType.QInt8, per_channel=True)
        for name, rewrite in (("per row, graph", quantize_rows), ("per row, fused", quantize_rows_fused)):
            model = onnx.load(str(src))
            rewrite(model)
            onnx.save(model, str(paths[name]))
        sessions = {}
        for name, path in paths.items():
            opts = ortops.session_options(ARGS.threads)
            # three pools on two cores: a pool that spins after its call would take the cores from the next
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sessions[name] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        x = {"x": x_all[:, :k].reshape(1, ARGS.rows, k).copy()}
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for sess in sessions.values():
            sess.run(None, x)
        for _ in range(ARGS.repeat):
            for name, sess in sessions.items():
                t0 = time.perf_counter()
                sess.run(None, x)
                times[name].append(time.perf_counter() - t0)
        row = {"K": k, "N": n, "rows": ARGS.rows, "threads": ARGS.threads, "isa": ortops.isa()}
        row.update({name: round(1e3 * float(np.median(ts)), 3) for name, ts in times.items()})
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
