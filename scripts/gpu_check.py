"""Correctness and speed of the CUDA paths on one GPU, section by section (issues 9, 17, 19).

On a machine with an NVIDIA GPU, torch (CUDA) and onnxruntime-gpu (docs/gpu.md says how to bring the wheel
to the lent device):

    python3 scripts/gpu_check.py --phase export --work /tmp/g     # torch + onnx only: the 124M exports
    python3 scripts/gpu_check.py --phase check --work /tmp/g --out results/   # onnxruntime-gpu: the rest

`--phase all` does both. Each section runs alone: a failure is recorded with its error and the next
section still runs; gpu_results.json is rewritten after every section, so a crash late keeps the early
numbers. `--device cpu --checkpoint random:tiny@0 --new-tokens 16` is a CPU dry run of the whole script.

Sections (GPT-2 124M shape, random weights, seed 0; reference: the CPU fp32 torch model):
- exports: fp32 concat; fp32 shared -> fp16 shared, fused (the default for a shared graph) and unfused.
- parity_fp32: onnxruntime CUDA fp32 with TF32 off (the default) and on, max|Δlogits|.
- parity_fp16: fp16 shared top-1 against the reference; CUDA-graph decode against uncaptured, same graph.
- greedy: 128 greedy tokens, CUDA graphs vs uncaptured, batch 1 and a left-padded batch of 8.
- cache_ops: rewind / keep_rows / drop_front / add_rows with CUDA graphs against a cache that never had
  the dropped positions or rows.
- speculative: batch 1, CUDA-graph target with an fp16 draft, tokens against plain greedy.
- speed: TTFT, decode tok/s, p50/p95 per token (runtime.tools.bench.time_case: warm-up, medians), batch 1 and 8:
  CUDA graphs (fused, unfused), uncaptured (fused, unfused), fp32 concat, torch CUDA fp16, and Hugging Face
  transformers fp16 eager `generate` as the peer.
- step: one decode step alone (backend.forward), CUDA graphs vs uncaptured: what the runtime adds around it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS: dict = {}


SELECTED: set[str] = set()


def section(out: Path, name: str):
    """Decorator: run the function, record its result or its error under `name`, write the JSON."""
    def wrap(fn):
        if SELECTED and name not in SELECTED:
            return fn
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            RESULTS[name] = fn()
        except Exception as e:  # noqa: BLE001 - one section's failure must not lose the others
            RESULTS[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
        RESULTS.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
        print(json.dumps(RESULTS[name], default=str)[:2000], flush=True)
        (out / "gpu_results.json").write_text(json.dumps(RESULTS, indent=1, default=str))
        return fn
    return wrap


def env_info() -> dict:
    info = {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()}
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                             "--format=csv,noheader"], capture_output=True, text=True,
                                            timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["nvidia_smi"] = "nvidia-smi unavailable"
    for mod in ("torch", "onnx", "onnxruntime", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            info[mod] = f"unavailable ({type(e).__name__})"
    try:
        import onnxruntime as ort
        info["ort_providers"] = ort.get_available_providers()
    except Exception:  # noqa: BLE001
        pass
    return info


def step_logits(backend, ids: np.ndarray, prefill: int) -> np.ndarray:
    """Logits for every position after the prefill: `prefill` tokens, then one token per step."""
    B, T = ids.shape
    backend.reset(B)
    mask = np.ones((B, T), np.int64)
    pos = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T))
    out = [backend.forward(ids[:, :prefill], mask[:, :prefill], pos[:, :prefill])[:, -1:]]
    for t in range(prefill, T):
        out.append(backend.forward(ids[:, t:t + 1], mask[:, :t + 1], pos[:, t:t + 1]))
    return np.concatenate(out, axis=1).astype(np.float32)


def cache_ops(backend, vocab: int) -> dict:
    """max|Δlogits| of a step after rewind(), keep_rows(), drop_front() and add_rows() (the joined row),
    against the same step on a cache that never held the dropped positions / rows, or the joined row alone."""
    rng = np.random.default_rng(1)
    ids, nxt = rng.integers(0, vocab, (3, 12)), rng.integers(0, vocab, (3, 2))
    ones, pos = np.ones((3, 16), np.int64), np.tile(np.arange(16), (3, 1))
    out = {}
    backend.reset(3)  # rewind: 12 positions, 1 more, back to 12, then another
    backend.forward(ids, ones[:, :12], pos[:, :12])
    backend.forward(rng.integers(0, vocab, (3, 1)), ones[:, :13], pos[:, 12:13])
    backend.rewind(12)
    got = backend.forward(nxt[:, :1], ones[:, :13], pos[:, 12:13])
    backend.reset(3)
    backend.forward(ids, ones[:, :12], pos[:, :12])
    out["rewind"] = float(np.abs(got - backend.forward(nxt[:, :1], ones[:, :13], pos[:, 12:13])).max())
    keep = [0, 2]
    backend.reset(3)
    backend.forward(ids, ones[:, :12], pos[:, :12])
    backend.keep_rows(keep)
    got = backend.forward(nxt[keep, :1], ones[keep, :13], pos[keep, 12:13])
    backend.reset(2)
    backend.forward(ids[keep], ones[keep, :12], pos[keep, :12])
    out["keep_rows"] = float(np.abs(got - backend.forward(nxt[keep, :1], ones[keep, :13], pos[keep, 12:13])).max())
    pad = ones[:, :12].copy()
    pad[:, :4] = 0
    backend.reset(3)
    backend.forward(ids, pad, np.maximum(np.cumsum(pad, 1) - 1, 0))
    backend.drop_front(4)
    got = backend.forward(nxt[:, :1], ones[:, :9], np.full((3, 1), 8))
    backend.reset(3)
    backend.forward(ids[:, 4:], ones[:, :8], pos[:, :8])
    out["drop_front"] = float(np.abs(got - backend.forward(nxt[:, :1], ones[:, :9], np.full((3, 1), 8))).max())
    backend.reset(2)
    backend.forward(ids[keep], ones[keep, :12], pos[keep, :12])
    backend.add_rows(ids[1:2, :7], ones[:1, :7], pos[:1, :7])
    mask = ones[:, :13].copy()
    mask[2, :5] = 0
    got = backend.forward(nxt[[0, 2, 1], :1], mask, np.array([[12], [12], [7]]))
    backend.reset(1)
    backend.forward(ids[1:2, :7], ones[:1, :7], pos[:1, :7])
    out["add_rows"] = float(np.abs(got[2] - backend.forward(nxt[1:2, :1], ones[:1, :8], pos[:1, 7:8])[0]).max())
    return out


def hf_peer(config, case, device: str, repeats: int) -> dict:
    """Hugging Face transformers GPT-2 (same shape, random weights) fp16 eager `generate`, greedy, KV cache:
    decode tok/s from the difference between `new` tokens and 1 token (the prefill), medians."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd, n_positions=config.block_size,
                     vocab_size=config.vocab_size)
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = GPT2LMHeadModel(cfg).to(device=device, dtype=dtype).eval()
    ids = torch.randint(0, config.real_vocab_size, (case.batch, case.prompt), device=device)

    def run(n):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    run(case.new)
    full = float(np.median([run(case.new) for _ in range(repeats)]))
    first = float(np.median([run(1) for _ in range(repeats)]))
    return {"ttft_ms": first * 1e3, "decode_tok_s": case.batch * (case.new - 1) / (full - first)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_results", help="folder for gpu_results.json / .md")
    ap.add_argument("--work", default="/tmp/nanogpt-gpu", help="where the ONNX exports go")
    ap.add_argument("--phase", default="all", choices=["export", "check", "all"])
    ap.add_argument("--checkpoint", default="random:gpt2@0")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sections", default="all",
                    help="comma-separated sections of the check phase to run (default: all)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: the same steps on the CPU (static decode instead of CUDA graphs): a dry run")
    args = ap.parse_args()
    dev, out, work = args.device, Path(args.out), Path(args.work)
    if args.sections != "all":
        SELECTED.update(args.sections.split(",") + ["reference"])
    out.mkdir(parents=True, exist_ok=True)
    prev = out / "gpu_results.json"
    if prev.exists():
        RESULTS.update(json.loads(prev.read_text()))
    RESULTS.setdefault("env", {})[args.phase] = env_info()
    RESULTS["checkpoint"], RESULTS["device"] = args.checkpoint, dev
    dirs = {k: work / k for k in ("fp32", "fp32-shared", "fp16-shared", "fp16-shared-unfused")}

    if args.phase in ("export", "all"):
        @section(out, "exports")
        def _():
            from export.graph import write_metadata
            from export.onnx import export_onnx
            from export.quantize import make_variant
            from model import GPT
            from runtime.artifact import data_digests, read_onnx_artifact

            model, took = GPT.from_pretrained(args.checkpoint), {}
            for name, dt, kv in (("fp32", "fp32", "concat"), ("fp32-shared", "fp32", "shared"),
                                 ("fp16-shared", "fp16", "shared")):
                t = time.perf_counter()
                export_onnx(model, dirs[name], dtype=dt, kv_cache=kv, logits="last" if kv == "concat" else "last:5",
                            source=args.checkpoint, force=True)
                took[name] = round(time.perf_counter() - t, 1)
            dst = dirs["fp16-shared-unfused"]  # what a shared fp16 export was before: no fusions, fp32 LayerNorms
            dst.mkdir(parents=True, exist_ok=True)
            src = dirs["fp32-shared"] / "model.onnx"
            make_variant(src, dst / "model.onnx", "fp16", fuse=False)
            write_metadata(dst / "model.onnx", dataclasses.replace(read_onnx_artifact(src), precision="fp16",
                                                                   data_sha256=data_digests(dst / "model.onnx")))
            nodes = {}
            import onnx
            for k, d in dirs.items():
                g = onnx.load(str(d / "model.onnx"), load_external_data=False).graph
                nodes[k] = len(g.node)
            return {"seconds": took, "nodes": nodes}

    if args.phase == "export":
        return 0

    from runtime.backends.onnxruntime import OnnxRuntimeBackend
    from runtime.backends.torch import TorchBackend
    from runtime.generation import SamplingParams, generate
    from runtime.tools.bench import Case, time_case

    graph = "graph" if dev == "cuda" else "static"  # the CPU dry run: the same fixed-shape steps, no capture

    def ort(name: str, decode: str = "dynamic", **kw):
        return OnnxRuntimeBackend(dirs[name], provider=dev, decode=decode, **kw)

    cfg = ort("fp32").config
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.real_vocab_size, (2, 64), dtype=np.int64)
    ref = {}

    @section(out, "reference")
    def _():
        ref["logits"] = step_logits(TorchBackend(args.checkpoint, device="cpu"), ids, 32)
        return {"shape": list(ref["logits"].shape)}

    @section(out, "parity_fp32")
    def _():
        res = {}
        for label, kw in (("tf32 off (default)", {}), ("tf32 on", {"tf32": True})):
            try:
                lg = step_logits(ort("fp32", **kw), ids, 32)
            except TypeError as e:  # a backend without the option
                res[label] = f"not available: {e}"
                continue
            res[label] = {"max_abs_diff": float(np.abs(lg - ref["logits"]).max())}
        return res

    @section(out, "parity_fp16")
    def _():
        res = {}
        for name in ("fp16-shared", "fp16-shared-unfused"):
            dyn = step_logits(ort(name), ids, 32)
            cap = step_logits(ort(name, graph), ids, 32)
            res[name] = {"top1_vs_cpu_fp32": float((dyn.argmax(-1) == ref["logits"].argmax(-1)).mean()),
                         "graph_top1_vs_cpu_fp32": float((cap.argmax(-1) == ref["logits"].argmax(-1)).mean()),
                         "graph_vs_uncaptured_max_abs_diff": float(np.abs(cap - dyn).max())}
        return res

    greedy = SamplingParams(temperature=0, max_new_tokens=args.new_tokens, stop_token_ids=(), repetition_penalty=1.0)

    @section(out, "greedy")
    def _():
        res = {}
        r2 = np.random.default_rng(2)
        for B in (1, 8):
            prompts = [r2.integers(0, cfg.real_vocab_size, 32 - 3 * (b % 4)).tolist() for b in range(B)]
            toks = {}
            for decode in ("dynamic", graph):
                be = ort("fp16-shared", decode)
                toks[decode] = [c.token_ids for c in generate(be, None, prompts, greedy)]
                if decode == graph:
                    res[f"b{B}_graph_stats"] = be.graph_stats()
            res[f"b{B}_identical_{args.new_tokens}"] = toks["dynamic"] == toks[graph]
            res[f"b{B}_rows_identical"] = [a == b for a, b in zip(toks["dynamic"], toks[graph])].count(True)
        return res

    @section(out, "cache_ops")
    def _():
        be = ort("fp16-shared", graph)
        return {**cache_ops(be, cfg.real_vocab_size), "graph_stats": be.graph_stats()}

    @section(out, "speculative")
    def _():
        from runtime.generation import SpeculativeGeneration

        prompts = [ids[0, :32].tolist()]
        plain = [c.token_ids for c in generate(ort("fp16-shared", "dynamic"), None, prompts, greedy)]
        target = ort("fp16-shared", graph)
        g = SpeculativeGeneration(target, None, prompts, greedy, ort("fp16-shared-unfused", graph), speculate=4)
        list(g)
        return {"identical": [c.token_ids for c in g.completions] == plain, "stats": g.stats,
                "graph_stats": target.graph_stats()}

    @section(out, "step")
    def _():
        res = {}
        for B in (1, 8):
            for decode, cap in (("dynamic", None), (graph, None), (graph, 256)):
                be = ort("fp16-shared", decode, graph_capacity=cap)
                be.reset(B)
                p = np.tile(np.arange(32), (B, 1))
                be.forward(np.ones((B, 32), np.int64), np.ones((B, 32), np.int64), p)
                times = []
                for t in range(32, 32 + args.new_tokens):
                    t0 = time.perf_counter()
                    be.forward(np.ones((B, 1), np.int64), np.ones((B, t + 1), np.int64), np.full((B, 1), t))
                    times.append(time.perf_counter() - t0)
                key = f"b{B} {decode}{f' capacity {cap}' if cap else ''} forward ms p50"
                res[key] = float(np.median(times[8:]) * 1e3)
        return res

    @section(out, "speed")
    def _():
        rows = []
        targets = {
            "onnxruntime fp16 shared, CUDA graphs (fused)": lambda: ort("fp16-shared", graph),
            "onnxruntime fp16 shared, CUDA graphs (fused), capacity 256": lambda: ort("fp16-shared", graph,
                                                                                      graph_capacity=256),
            "onnxruntime fp16 shared, CUDA graphs (unfused)": lambda: ort("fp16-shared-unfused", graph),
            "onnxruntime fp16 shared, uncaptured (fused)": lambda: ort("fp16-shared", "dynamic"),
            "onnxruntime fp16 shared, uncaptured (unfused, before)": lambda: ort("fp16-shared-unfused", "dynamic"),
            "onnxruntime fp32 concat (TF32 off)": lambda: ort("fp32"),
            "torch fp16 eager": lambda: TorchBackend(args.checkpoint, device=dev, dtype="fp16"),
        }
        for batch in [int(b) for b in args.batches.split(",")]:
            case = Case(batch=batch, prompt=args.prompt_len, new=args.new_tokens)
            for label, make in targets.items():
                try:
                    be = make()
                    t = time_case(be, case, warmup=1, repeats=args.repeats)
                    row = {"target": label, "batch": batch, "ttft_ms": t["ttft_ms"], "decode_tok_s": t["decode_tok_s"],
                           "p50_ms": t["latency_p50_ms"], "p95_ms": t["latency_p95_ms"]}
                    if hasattr(be, "graph_stats"):
                        row["graph_stats"] = be.graph_stats()
                except Exception as e:  # noqa: BLE001
                    row = {"target": label, "batch": batch, "error": f"{type(e).__name__}: {e}"}
                rows.append(row)
                print(row, flush=True)
            try:
                rows.append({"target": "transformers fp16 eager generate (peer)", "batch": batch,
                             **hf_peer(cfg, case, dev, args.repeats)})
            except Exception as e:  # noqa: BLE001
                rows.append({"target": "transformers fp16 eager generate (peer)", "batch": batch, "error": str(e)})
            print(rows[-1], flush=True)
        return rows

    lines = [f"GPU: {RESULTS['env'].get('check', {}).get('nvidia_smi')}", "",
             "| target | batch | TTFT ms | decode tok/s | p50 ms | p95 ms |", "|---|---|---|---|---|---|"]
    for r in RESULTS.get("speed", []) if isinstance(RESULTS.get("speed"), list) else []:
        if "error" in r:
            lines.append(f"| {r['target']} | {r['batch']} | error: {r['error'][:80]} | | | |")
        else:
            lines.append(f"| {r['target']} | {r['batch']} | {r['ttft_ms']:.1f} | {r['decode_tok_s']:.0f} | "
                         f"{r.get('p50_ms', float('nan')):.3f} | {r.get('p95_ms', float('nan')):.3f} |")
    (out / "gpu_results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
