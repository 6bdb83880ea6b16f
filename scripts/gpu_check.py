"""Correctness and speed of the CUDA paths on one GPU, in one run (issue 9).

On a machine with an NVIDIA GPU, torch (CUDA) and onnxruntime-gpu (see docs/gpu.md for bringing the
wheel to the lent device):

    python3 scripts/gpu_check.py --out results/           # writes gpu_results.json and gpu_results.md

1. Correctness, GPT-2 124M shape (random weights, seed 0) against the CPU fp32 torch reference:
   torch CUDA fp32 (max|Δlogits|) and fp16 (top-1 agreement); onnxruntime CUDA EP with IO binding,
   fp32 and fp16, driven step by step through the runtime's backend (prefill then one-token decode),
   checking that every present/past OrtValue stays on the GPU; greedy token identity over 64 tokens.
   Cache surgery on the device: Backend.rewind, keep_rows, add_rows and drop_front (onnxruntime CUDA concat and shared,
   torch CUDA) against never having had the dropped positions / rows; speculative decoding on a batch
   (runtime/speculative.py, concat caches with holes) against plain generation, token for token.
2. Speed: TTFT, decode tok/s, per-token latency p50/p95; batch 1 and 8; fp32 and fp16; torch eager
   CUDA vs onnxruntime CUDA EP (IO binding), timed by runtime.bench.time_case (the `bench` command's
   method: warm-up, medians); both backends return host logits, which synchronizes each step.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def env_info() -> dict:
    import onnxruntime as ort
    import torch

    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        smi = "nvidia-smi unavailable"
    return {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "nvidia_smi": smi,
            "cuda_torch": torch.version.cuda, "torch": torch.__version__, "onnxruntime": ort.__version__,
            "ort_providers": ort.get_available_providers(), "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine()}


def step_logits(backend, ids: np.ndarray, prefill: int) -> np.ndarray:
    """Logits for every position of `ids`, prefill of `prefill` tokens then one token per step."""
    B, T = ids.shape
    backend.reset(B)
    mask = np.ones((B, T), np.int64)
    pos = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T))
    out = [backend.forward(ids[:, :prefill], mask[:, :prefill], pos[:, :prefill])]
    for t in range(prefill, T):
        out.append(backend.forward(ids[:, t:t + 1], mask[:, :t + 1], pos[:, t:t + 1]))
    return np.concatenate(out, axis=1).astype(np.float32)


def cache_ops(backend, vocab: int) -> dict:
    """max|Δlogits| of a step after rewind(), after keep_rows(), and after add_rows() (the joined row), against
    the same step on a cache that never held the dropped positions / rows, or held the joined row alone."""
    rng = np.random.default_rng(1)
    ids, nxt = rng.integers(0, vocab, (3, 12)), rng.integers(0, vocab, (3, 2))
    ones, pos = np.ones((3, 16), np.int64), np.tile(np.arange(16), (3, 1))
    out = {}
    backend.reset(3)  # rewind: 12 positions, 2 more, back to 12, then the same 2 again
    backend.forward(ids, ones[:, :12], pos[:, :12])
    backend.forward(rng.integers(0, vocab, (3, 2)), ones[:, :14], pos[:, 12:14])
    backend.rewind(12)
    got = backend.forward(nxt, ones[:, :14], pos[:, 12:14])
    backend.reset(3)
    backend.forward(ids, ones[:, :12], pos[:, :12])
    out["rewind_max_abs_diff"] = float(np.abs(got - backend.forward(nxt, ones[:, :14], pos[:, 12:14])).max())
    keep = [0, 2]  # keep_rows: rows 0 and 2 of 3
    backend.reset(3)
    backend.forward(ids, ones[:, :12], pos[:, :12])
    backend.keep_rows(keep)
    got = backend.forward(nxt[keep, :1], ones[keep, :13], pos[keep, 12:13])
    backend.reset(2)
    backend.forward(ids[keep], ones[keep, :12], pos[keep, :12])
    want = backend.forward(nxt[keep, :1], ones[keep, :13], pos[keep, 12:13])
    out["keep_rows_max_abs_diff"] = float(np.abs(got - want).max())
    pad = ones[:, :12].copy()  # drop_front: 4 positions of left padding in every row, dropped
    pad[:, :4] = 0
    backend.reset(3)
    backend.forward(ids, pad, np.maximum(np.cumsum(pad, 1) - 1, 0))
    backend.drop_front(4)
    got = backend.forward(nxt[:, :1], ones[:, :9], np.full((3, 1), 8))
    backend.reset(3)
    backend.forward(ids[:, 4:], ones[:, :8], pos[:, :8])
    out["drop_front_max_abs_diff"] = float(np.abs(got - backend.forward(nxt[:, :1], ones[:, :9], np.full((3, 1), 8))).max())
    backend.reset(2)  # add_rows: rows 0 and 2 run 12 positions, row 1 joins with 7, then one step of all three
    backend.forward(ids[keep], ones[keep, :12], pos[keep, :12])
    joined = backend.add_rows(ids[1:2, :7], ones[:1, :7], pos[:1, :7])
    mask = ones[:, :13].copy()
    mask[2, :5] = 0  # the joining row's cache is 5 positions narrower: masked on its left
    got = backend.forward(nxt[[0, 2, 1], :1], mask, np.array([[12], [12], [7]]))
    backend.reset(1)
    first = backend.forward(ids[1:2, :7], ones[:1, :7], pos[:1, :7])
    want = backend.forward(nxt[1:2, :1], ones[:1, :8], pos[:1, 7:8])
    out["add_rows_max_abs_diff"] = float(max(np.abs(got[2] - want[0]).max(), np.abs(joined[:, -1] - first[:, -1]).max()))
    return out


def top1(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_results", help="folder for gpu_results.json / .md")
    ap.add_argument("--work", default="/tmp/nanogpt-gpu", help="where the ONNX exports go")
    ap.add_argument("--checkpoint", default="random:gpt2@0")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu runs the same steps on the CPU: a dry run of this script where there is no GPU")
    args = ap.parse_args()
    dev = args.device

    import onnxruntime as ort
    import torch

    from export.onnx import export_onnx
    from model import GPT
    from runtime.backends.onnxruntime import OnnxRuntimeBackend
    from runtime.backends.torch import TorchBackend
    from runtime.bench import Case, time_case
    from runtime.generate import SamplingParams, generate

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"env": env_info(), "checkpoint": args.checkpoint, "device": dev}
    print(json.dumps(res["env"], indent=1), flush=True)
    if dev == "cuda" and ("CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available()):
        print("error: needs torch CUDA and onnxruntime-gpu's CUDAExecutionProvider (docs/gpu.md)", file=sys.stderr)
        return 2

    work = Path(args.work)
    model = GPT.from_pretrained(args.checkpoint)
    dirs = {}
    for dt, kv in (("fp32", "concat"), ("fp16", "concat"), ("fp16", "shared")):
        t, name = time.perf_counter(), dt if kv == "concat" else f"{dt} shared"
        dirs[name] = export_onnx(model, work / name.replace(" ", "-"), dtype=dt, kv_cache=kv, source=args.checkpoint,
                                 force=True).parent
        print(f"exported {name} in {time.perf_counter() - t:.1f}s", flush=True)

    # -- correctness ------------------------------------------------------------------------------
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.config.real_vocab_size, (2, 64), dtype=np.int64)
    ref = step_logits(TorchBackend(args.checkpoint, device="cpu"), ids, 32)
    # the GPU targets: label -> a function opening a fresh backend ("fp16 shared": KV cache updated in place by
    # GroupQueryAttention, export --kv-cache shared)
    targets = {f"{kind} cuda {dt}": (lambda kind=kind, dt=dt: TorchBackend(args.checkpoint, device=dev, dtype=dt)
                                     if kind == "torch" else OnnxRuntimeBackend(dirs[dt], provider=dev))
               for kind in ("torch", "onnxruntime") for dt in ("fp32", "fp16", "fp16 shared") if (kind, dt) != ("torch", "fp16 shared")}
    par = {}
    for label, make in targets.items():
        be = make()
        lg = step_logits(be, ids, 32)
        row = {"max_abs_diff": float(np.abs(lg - ref).max()), "top1_agreement": top1(lg, ref)}
        if isinstance(be, OnnxRuntimeBackend):  # the cache must live on the GPU between steps
            row["kv_device"] = sorted({"cpu" if isinstance(v, np.ndarray) else v.device_name().lower()
                                       for v in (be._cache if be.kv_cache == "shared" else be._past)})
        par[label] = row
        print(label, row, flush=True)
    res["parity_vs_cpu_fp32"] = par

    greedy = SamplingParams(temperature=0, max_new_tokens=64, stop_token_ids=(), repetition_penalty=1.0)
    prompt = [ids[0, :32].tolist()]
    toks = {}
    for label, make in {
        "torch cpu fp32": lambda: TorchBackend(args.checkpoint, device="cpu"),
        "torch cuda fp32": lambda: TorchBackend(args.checkpoint, device=dev),
        "onnxruntime cuda fp32": lambda: OnnxRuntimeBackend(dirs["fp32"], provider=dev),
    }.items():
        toks[label] = generate(make(), None, prompt, greedy)[0].token_ids
    base = toks["torch cpu fp32"]
    res["greedy_identical_64"] = {k: v == base for k, v in toks.items()}
    print("greedy identical:", res["greedy_identical_64"], flush=True)

    ops = {}
    for label in ("onnxruntime cuda fp32", "onnxruntime cuda fp16 shared", "torch cuda fp32"):
        ops[label] = cache_ops(targets[label](), model.config.real_vocab_size)
        print(label, ops[label], flush=True)
    res["cache_ops"] = ops
    from runtime.speculative import SpeculativeGeneration

    target, guesser = OnnxRuntimeBackend(dirs["fp32"], provider=dev), OnnxRuntimeBackend(dirs["fp16"], provider=dev)
    prompts = [ids[0, :32].tolist(), ids[1, :20].tolist()]
    plain = [c.token_ids for c in generate(target, None, prompts, greedy)]
    g = SpeculativeGeneration(target, None, prompts, greedy, guesser, speculate=4)
    list(g)
    res["speculative_batch"] = {"identical": [c.token_ids for c in g.completions] == plain, **g.stats}
    print("speculative batch (fp32 target, fp16 draft):", res["speculative_batch"], flush=True)

    # -- speed ------------------------------------------------------------------------------------
    bench = []  # runtime.bench's own timing: warm-up, medians, per-token latency percentiles
    for batch in [int(b) for b in args.batches.split(",")]:
        case = Case(batch=batch, prompt=args.prompt_len, new=args.new_tokens)
        for label, make in targets.items():
            be = make()
            t = time_case(be, case, warmup=1, repeats=args.repeats)
            row = {"backend": label, "batch": batch, "ttft_ms": t["ttft_ms"], "decode_tok_s": t["decode_tok_s"],
                   "p50_ms": t["latency_p50_ms"], "p95_ms": t["latency_p95_ms"]}
            bench.append(row)
            print(row, flush=True)
            del be
            if dev == "cuda":
                torch.cuda.empty_cache()
    res["bench"] = bench
    b1 = {r["backend"]: r["decode_tok_s"] for r in bench if r["batch"] == 1}
    for kv in ("fp16", "fp16 shared"):
        key = kv.replace(" ", "_")
        res[f"goal_ort_{key}_vs_torch_eager_b1"] = b1[f"onnxruntime cuda {kv}"] / b1["torch cuda fp32"]
        res[f"goal_ort_{key}_vs_torch_eager_fp16_b1"] = b1[f"onnxruntime cuda {kv}"] / b1["torch cuda fp16"]

    if dev == "cpu":  # labels say cuda; this was the CPU dry run
        res["note"] = "dry run on the CPU: every 'cuda' label ran on the CPU"
    (out / "gpu_results.json").write_text(json.dumps(res, indent=1))
    lines = [f"GPU: {res['env']['nvidia_smi']}; torch {res['env']['torch']} (CUDA {res['env']['cuda_torch']}), "
             f"onnxruntime {res['env']['onnxruntime']}", "",
             "| backend | batch | TTFT ms | decode tok/s | p50 ms | p95 ms |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['backend']} | {r['batch']} | {r['ttft_ms']:.1f} | {r['decode_tok_s']:.1f} | {r['p50_ms']:.2f} | "
              f"{r['p95_ms']:.2f} |" for r in bench]
    lines += ["", "| parity vs CPU fp32 | max abs diff | top-1 |", "|---|---|---|"]
    lines += [f"| {k} | {v['max_abs_diff']:.2e} | {v['top1_agreement']:.4f} |" for k, v in par.items()]
    (out / "gpu_results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    ok = (par["onnxruntime cuda fp32"]["max_abs_diff"] <= 1e-3 and par["onnxruntime cuda fp16"]["top1_agreement"] >= 0.99
          and par["onnxruntime cuda fp16 shared"]["top1_agreement"] >= 0.99
          and par["torch cuda fp16"]["top1_agreement"] >= 0.99 and all(res["greedy_identical_64"].values())
          and all(v <= (1e-2 if "fp16" in k else 1e-4) for k, o in ops.items() for v in o.values())
          and res["speculative_batch"]["identical"])
    print("correctness:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
