"""`nanogpt-deploy export SOURCE --out DIR`: checkpoint -> validated, self-describing model.onnx.

    nanogpt-deploy export random:tiny --out out/tiny
    nanogpt-deploy export model/weights/pycode --out out/pycode-int8 --quantize int8
    nanogpt-deploy export gpt2 --out out/gpt2-fp16 --dtype fp16
    nanogpt-deploy export gpt2 --out out/gpt2-serve --opset 23 --logits last     # serving: faster time to first token
    nanogpt-deploy export gpt2 --out out/gpt2-ort --opset 23 --logits last --kv-cache shared   # fastest on onnxruntime

Stages go to stderr as they run; the summary (file, size, max|Δ| per shape, variant agreement,
seconds) to stdout, or one JSON object with --json. Heavy imports happen inside `run`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="HF GPT-2 folder, project folder, nanoGPT ckpt.pt, hub name, or random:PRESET[@SEED]")
    p.add_argument("--out", required=True, metavar="DIR", help="folder receiving model.onnx (+ model.onnx.data)")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                   help="fp32 (portable, default) or fp16 (GPU; LayerNorm/Softmax kept fp32, fp16 KV cache I/O)")
    p.add_argument("--quantize", choices=("q8", "int8", "int4"), default=None,
                   help="CPU variant: q8 (near-lossless: 8-bit blocks, lookups fp32), int8 (dynamic, MatMul "
                        "weights) or int4 (4-bit blocks, the lm_head's top 32 logits redone at 8 bits); onnxruntime "
                        "only; DIR then holds the quantized graph, validated against fp32")
    p.add_argument("--logits", type=logits_mode, default="all", metavar="{all,last,last:N}",
                   help="all: logits [batch, sequence, vocab] (default; what other tools expect); last: only the last "
                        "position's logits, faster prefill/TTFT; perplexity then needs step-by-step decoding; "
                        "last:N: the last N positions, for a speculative-decoding target (generate --draft), "
                        "e.g. last:5 for --speculate 4")
    p.add_argument("--kv-cache", choices=("concat", "shared"), default="concat",
                   help="concat: present = Concat(past, new), standard ONNX that TensorRT and other runtimes run "
                        "(default); shared: onnxruntime's GroupQueryAttention updates one cache buffer in place "
                        "(faster decode, most at batch > 1; onnxruntime only, CUDA needs --dtype fp16)")
    p.add_argument("--opset", type=int, default=18,
                   help="ONNX opset: 18 (default) up to the highest the installed torch exporter, onnx and "
                        "onnxruntime support (23 with torch 2.13)")
    p.add_argument("--force", action="store_true", help="write into a DIR that holds unrelated files")
    p.add_argument("--no-tool-files", dest="tool_files", action="store_false",
                   help="write only model.onnx (+ .data): leave out config.json, genai_config.json and the tokenizer "
                        "files that optimum, transformers and onnxruntime-genai read (docs/export.md: Use it from other tools)")
    p.add_argument("--no-gate", action="store_true",
                   help="record a variant's agreement with fp32 but do not fail on its thresholds")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def run(args) -> int:
    t0 = time.perf_counter()

    def stage(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    from model import GPT

    from .onnx import check_options, export_onnx
    from .publish import prepare_out_dir

    check_options(args.opset, args.dtype, args.quantize, args.logits, args.kv_cache)  # cheap checks before a slow load
    out = Path(args.out).expanduser()
    made = missing_dirs(out)
    try:
        prepare_out_dir(out, args.force)
        stage(f"loading {args.source}")
        model = GPT.from_pretrained(args.source)
        path = export_onnx(model, out, opset=args.opset, dtype=args.dtype, quantize=args.quantize,
                           logits=args.logits, kv_cache=args.kv_cache, source=args.source, force=args.force,
                           tool_files=args.tool_files, gate=False if args.no_gate else None, progress=stage)
    except BaseException:
        remove_made_dirs(made)  # a failed export leaves no DIR behind that it created; one that existed stays
        raise
    summary = summarize(path, time.perf_counter() - t0)
    print(json.dumps(summary, sort_keys=True) if args.json else format_summary(summary))
    return 0


def missing_dirs(path: Path) -> list[Path]:
    """The folders of `path` that do not exist yet, deepest first: what creating it makes."""
    made, p = [], path.absolute()
    while not p.exists() and not p.is_symlink() and p != p.parent:
        made.append(p)
        p = p.parent
    return made


def remove_made_dirs(made: list[Path]) -> None:
    """Remove the folders `missing_dirs` listed, deepest first, while they are empty (our `.export-*` temp
    folders aside): never a file, nor a folder something else has since written into."""
    from .publish import clear_temp_dirs

    if made and made[0].is_dir():
        clear_temp_dirs(made[0])
    for d in made:
        try:
            d.rmdir()
        except OSError:
            return


def summarize(path, seconds: float) -> dict:
    from runtime.artifact import read_onnx_artifact

    from .ecosystem import TOOL_FILES

    art = read_onnx_artifact(path)
    files = {f.name: f.stat().st_size for f in sorted(path.parent.iterdir()) if f.name.startswith("model.onnx")}
    tools = [n for n in TOOL_FILES if (path.parent / n).is_file()]
    return {"path": str(path), "precision": art.precision, "opset": art.versions.get("opset"), "logits": art.logits,
            "kv_cache": art.kv_cache,
            "bytes": sum(files.values()), "files": files, "tool_files": tools, "seconds": round(seconds, 2),
            "parity": art.extra.get("parity"), "variant": art.extra.get("variant"),
            "quantization": art.extra.get("quantization")}


def logits_mode(value: str) -> str:
    """argparse type of --logits: all, last, or last:N."""
    from runtime.artifact import ArtifactError, logits_keep

    try:
        logits_keep(value)
    except ArtifactError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def format_summary(s: dict) -> str:
    lines = [f"wrote {s['path']} ({', '.join(s['files'])}): {s['bytes'] / 1e6:.1f} MB "
             f"[{s['precision']}, opset {s['opset']}, logits {s.get('logits', 'all')}, kv_cache {s.get('kv_cache', 'concat')}] in {s['seconds']:.1f} s"]
    if s.get("tool_files"):
        lines.append(f"for other tools: {', '.join(s['tool_files'])}")
    if s["parity"]:
        p = s["parity"]
        shapes = "  ".join(f"{k} {max(v.values()):.1e}" for k, v in p["shapes"].items())
        mode = s.get("logits", "all")
        last = " (last position)" if mode == "last" else f" (last {mode[5:]} positions)" if mode != "all" else ""
        lines.append(f"fp32 onnxruntime vs torch{last}, max|Δ| (atol {p['atol']:.0e}): {shapes}")
    if s["variant"]:
        v = s["variant"]
        lines.append(f"{s['precision']} vs fp32 on {v['eval_tokens']} tokens: top-1 agreement {v['top1_agreement']:.2%} "
                     f"(min {v['thresholds']['min_top1_agreement'] * 100:g}%), perplexity {v['ppl_fp32']:.3f} -> {v['ppl']:.3f} "
                     f"({v['ppl_change']:+.2%}, max +{v['thresholds']['max_ppl_change']:.0%})"
                     + ("" if v["gated"] else " [recorded, not enforced]"))
    if s.get("quantization") and "lm_head" in s["quantization"]:
        lines.append(quantization_line(s["quantization"]))
    return "\n".join(lines)


def quantization_line(q: dict) -> str:
    """What a q8 / int8 / int4 file holds, which is what its size follows from."""
    layers = f"{q['bits']}-bit blocks of {q['block_size']}" if "bits" in q else f"{q.get('weight_type', '?')} per tensor"
    line = f"layers {layers}; lm_head {q['lm_head']}; lookups {q.get('embeddings', 'as exported')}"
    if q.get("embeddings") == "fp32" and q["lm_head"].startswith("untied"):
        line += (" (the vocabulary is stored twice, fp32 for the lookups and quantized for the lm_head: a model whose"
                 " vocabulary is most of its weights gets a file larger than fp32's)")
    return line
