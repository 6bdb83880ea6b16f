"""The fp32 decode roofline of this machine: weight-streaming bandwidth and a MatMul-only decode step.

Prints (1) GEMV bandwidth against working-set size (torch `x @ W` over several matrices; caches help below
a few hundred MB, the DRAM stream rate shows above), and (2) the time of a graph holding only the weight
MatMuls of one GPT-2 124M decode step (49 MatMuls, no attention / LayerNorm / anything else) on
onnxruntime and on torch, for a batch of 1 row (GEMVs: memory-bound) and of 8 (arithmetic: 2 GFLOP a
step). No engine decodes fp32 faster than (2) allows. docs/benchmarks.md quotes it.

    .venv/bin/python scripts/roofline.py --threads 2 [--rows 1,8]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def timed(fn, n: int = 10) -> float:
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="1,8", help="batch sizes of the MatMul-only decode step (default 1,8)")
    args = p.parse_args()
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    torch.set_num_threads(args.threads)
    x = torch.randn(1, 768)
    for mb in (50, 150, 300, 450, 600, 1200):
        ws = [torch.randn(768, int(mb * 1e6 / 4 / 768) // 8) for _ in range(8)]
        dt = timed(lambda ws=ws: [x @ w for w in ws])
        print(f"GEMV working set {mb:5d} MB: {mb / 1e3 / dt:5.1f} GB/s")
        del ws

    # one decode step's weight MatMuls, GPT-2 124M: per layer c_attn, attn.c_proj, c_fc, mlp.c_proj; then lm_head
    rng = np.random.default_rng(0)
    shapes = [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 12 + [(768, 50257)]
    weights = [rng.standard_normal(s, dtype=np.float32) * 0.02 for s in shapes]
    nodes = [helper.make_node("MatMul", ["x" if k == 768 else "h", f"w{i}"],
                              [f"y{i}"]) for i, (k, _) in enumerate(shapes)]
    graph = helper.make_graph(
        nodes, "matmuls", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 768]),
                           helper.make_tensor_value_info("h", TensorProto.FLOAT, ["rows", 3072])],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(len(shapes))],
        [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)])
    gb = sum(w.nbytes for w in weights) / 1e9
    flop = 2 * sum(k * n for k, n in shapes)  # per row
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "matmuls.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path),
                  save_as_external_data=True, location="matmuls.onnx.data")
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        tw = [torch.from_numpy(w) for w in weights]
        for rows in (int(r) for r in args.rows.split(",")):
            feed = {"x": rng.standard_normal((rows, 768), dtype=np.float32),
                    "h": rng.standard_normal((rows, 3072), dtype=np.float32)}
            t_ort = timed(lambda feed=feed: s.run(None, feed), 20)
            tx, th = torch.from_numpy(feed["x"]), torch.from_numpy(feed["h"])
            t_torch = timed(lambda tx=tx, th=th: [(tx if w.shape[0] == 768 else th) @ w for w in tw], 20)
            for name, t in (("onnxruntime", t_ort), ("torch", t_torch)):
                print(f"124M decode step of {rows} row(s), weight MatMuls only ({gb * 1e3:.0f} MB), {name}: "
                      f"{t * 1e3:.2f} ms = {rows / t:.1f} tok/s at most ({gb / t:.1f} GB/s, "
                      f"{rows * flop / t / 1e9:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
