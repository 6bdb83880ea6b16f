"""`nanogpt-deploy build-engine MODEL_DIR --out ENGINE`: compile an exported model.onnx into a TensorRT engine.

    nanogpt-deploy build-engine out/tiny --out out/tiny/model.engine --max-batch 8 --max-seq 128
    nanogpt-deploy generate out/tiny/model.engine --backend tensorrt --prompt "def main():"

Needs `pip install 'nanogpt-deploy[tensorrt]'` and an NVIDIA GPU; the engine runs on GPUs of the
compute capability it was built on, under the same TensorRT version.
"""
from __future__ import annotations

import json

from runtime.cli.args import float_in, int_in, positive_int


def add_arguments(p) -> None:
    p.add_argument("model", metavar="MODEL_DIR", help="an export folder (or its model.onnx), fp32 or fp16")
    p.add_argument("--out", metavar="ENGINE", default=None,
                   help="the engine file to write (default: MODEL_DIR/model.engine); its sidecar goes to ENGINE.json")
    p.add_argument("--max-batch", type=positive_int, default=8, help="largest batch the engine serves (default: 8)")
    p.add_argument("--max-seq", type=positive_int, default=None,
                   help="largest total context, past + new tokens (default: the model's block_size)")
    p.add_argument("--opt-batch", type=positive_int,
                   default=1, help="batch size TensorRT tunes kernels for (default: 1)")
    p.add_argument("--opt-seq", type=positive_int, default=None,
                   help="prompt length TensorRT tunes the prefill profile for (default: min(128, max-seq))")
    p.add_argument("--workspace-gb", type=float_in(0, 1024, "a size in GiB", above=True),
                   default=4.0, help="TensorRT scratch memory limit in GiB (default: 4)")
    p.add_argument("--timing-cache", metavar="PATH", default=None,
                   help="timing cache to reuse and update (default: one per TensorRT version and GPU under "
                        "~/.cache/nanogpt-deploy/tensorrt)")
    p.add_argument("--no-timing-cache", action="store_true", help="build without a timing cache")
    p.add_argument("--device", type=int_in(0, None, "a CUDA device index"),
                   default=0, help="CUDA device to build on (default: 0)")
    p.add_argument("--tf32", action="store_true",
                   help="let fp32 layers run in TF32: faster, ~1e-3 off fp32 (default: off, the engine is fp32)")
    p.add_argument("--verbose", action="store_true", help="TensorRT's verbose log")
    p.add_argument("--json", action="store_true", help="print the sidecar as JSON instead of the summary line")


def run(args) -> int:
    from .tensorrt import build_engine

    timing_cache = None if args.no_timing_cache else (args.timing_cache or True)
    meta = build_engine(args.model, args.out, max_batch=args.max_batch, max_seq=args.max_seq,
                        opt_batch=args.opt_batch, opt_seq=args.opt_seq, workspace_gb=args.workspace_gb,
                        timing_cache=timing_cache, device=args.device, verbose=args.verbose,
                        tf32=args.tf32)
    if args.json:
        print(json.dumps(meta.to_dict(), indent=2, sort_keys=True))
        return 0
    from pathlib import Path

    from runtime.artifact import resolve_onnx

    engine = Path(args.out) if args.out else resolve_onnx(args.model).parent / "model.engine"
    print(f"{engine} ({meta.engine_bytes / 1e6:.1f} MB) built in {meta.build['build_seconds']:.1f} s "
          f"[TensorRT {meta.tensorrt_version}, {meta.gpu_name}, sm_{meta.compute_capability.replace('.', '')}, "
          f"{meta.precision}{', tf32' if meta.build.get('tf32') else ''}; batch <= {meta.max_batch}, "
          f"context <= {meta.max_seq}]")
    return 0
