"""This project's onnxruntime runtime against what users run today, on one checkpoint, machine and token counts.

Peers: Hugging Face transformers `generate` (torch eager, KV cache, greedy) and optimum's
`ORTModelForCausalLM` (exported with export=True from the same local folder, use_cache=True); CTranslate2
(`ctranslate2-fp32` / `-int8`: `TransformersConverter` on the same folder, `generate_tokens` at batch 1,
`generate_batch` at batch 8) and llama.cpp through llama-cpp-python (`llamacpp-f16` / `-q8_0` / `-q4_0`, any
`LLAMA_FTYPE_MOSTLY_*` name: llama.cpp's own `convert_hf_to_gguf.py` writes an f32 GGUF, `llama_model_quantize`
makes the rest; greedy by argmax over the last position's logits, token by token; batch 8 as llama.cpp's server
decodes parallel requests: one context of 8 sequences, one llama_decode a step for all rows). Both converters
read GPT-2's tokenizer files, written into the folder by `python -m export.hf_tokenizer` (from gpt2.tiktoken). Ours:
`runtime.generation` on the onnxruntime backend, fp32 / int8 / int4 exports of that folder with `--opset 23`
(a validated export option: SDPA becomes one ONNX Attention node; 327 graph nodes instead of 577) and
`--logits last` (logits of the last position only, as transformers' generate computes in prefill;
`--logits all` measures the full-logits exports) and `--kv-cache shared` (the KV cache updated in place by
onnxruntime's GroupQueryAttention; `ours-fp32-concat` runs the standard concat graph beside it, so one
run shows before and after). `ours-fp32-spec-int8` / `-int4` decode the fp32 model's own output
speculatively (runtime/generation/speculative.py): the int8 / int4 export guesses up to 4 tokens, an fp32 export
keeping 5 logits positions (`--logits last:5`) checks them in one step, batch 1 and batch 8 alike; both
with the concat KV cache, whose mask keeps the holes a batch's rows leave when they accept different
numbers of guesses (onnxruntime's CPU GroupQueryAttention takes no multi-token step after a past at
batch > 1). The checkpoint is GPT-2 124M-shaped with random weights
(torch seed fixed), written once with save_pretrained.

Every engine runs in its own process with the same thread count and the same seeded prompt ids; greedy,
never stopping early. All engines are loaded at once and driven in turns (each round runs each workload
on each engine back to back), so load from other processes falls on all of them alike. Measured per
engine, medians over --repeats rounds after --warmup rounds: batch 1, prompt 32, 128 new tokens (time to
first token, decode tok/s, end-to-end tok/s); time to first token for a 512-token prompt (one generate
call of 1 new token); batch 8 throughput (8 x 128 new tokens / wall time); peak RSS. Ratios against
transformers and optimum, and the issue's goals, are printed as a table (or --json).

Needs the peers' environment (transformers < 4.58 for optimum-onnx 0.1.0): scripts/setup_peers.sh. An engine
whose package is missing there is skipped with a line naming the setup flag that installs it.

    bash scripts/setup_peers.sh --with-ctranslate2 --with-llama-cpp   # builds .venv-peers once
    .venv-peers/bin/python scripts/compare_peers.py --threads 2 --repeats 5
    .venv-peers/bin/python scripts/compare_peers.py --json > out/peers/compare.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the default list and the table's order; "ours-<quant>" (an `export --quantize` value), "ctranslate2-<type>"
# (CT2_TYPES) and "llamacpp-<type>" (a llama_cpp.LLAMA_FTYPE_MOSTLY_<TYPE>) run too when named
ENGINES = ("transformers", "optimum", "ctranslate2-fp32", "ctranslate2-int8", "llamacpp-f16", "llamacpp-q8_0",
           "llamacpp-q4_0", "ours-fp32", "ours-q8", "ours-int8", "ours-int4", "ours-fp32-concat", "ours-fp32-spec-int8",
           "ours-fp32-spec-int4")
CT2_TYPES = {"fp32": "float32", "int8": "int8", "int8_float32": "int8_float32", "int16": "int16"}  # -> quantization
LLAMA_CPP = ROOT / "peers" / "llama.cpp"  # convert_hf_to_gguf.py + conversion/ + gguf-py/, from the sdist
SETUP = "bash scripts/setup_peers.sh"
SPECULATE = 4  # ours-fp32-spec-*: guesses per round; the target keeps SPECULATE + 1 logits positions
VOCAB = 50257
# the goals: (engine, measure, against, min ratio)
GOALS = (("ours-fp32", "decode_tok_s", "transformers", 1.8), ("ours-fp32", "decode_tok_s", "optimum", 1.5),
         ("ours-int8", "decode_tok_s", "transformers", 4.0), ("ours-int4", "decode_tok_s", "transformers", 6.0),
         ("ours-fp32", "batch8_tok_s", "transformers", 2.0),
         # issue 24: against llama.cpp at the nearest precision
         ("ours-q8", "decode_tok_s", "llamacpp-f16", 1.2), ("ours-int8", "decode_tok_s", "llamacpp-q8_0", 1.5),
         ("ours-int4", "decode_tok_s", "llamacpp-q4_0", 1.5),
         # the fp32 model's own output, decoded speculatively (runtime/generation/speculative.py): reported beside,
         # not instead
         ("ours-fp32-spec-int8", "decode_tok_s", "transformers", 1.8),
         ("ours-fp32-spec-int8", "decode_tok_s", "optimum", 1.5),
         ("ours-fp32-spec-int4", "decode_tok_s", "transformers", 1.8),
         ("ours-fp32-spec-int4", "decode_tok_s", "optimum", 1.5),
         ("ours-fp32-spec-int8", "batch8_tok_s", "transformers", 2.0),
         ("ours-fp32-spec-int4", "batch8_tok_s", "transformers", 2.0))


OURS_QUANTS = ("fp32", "q8", "int8", "int4")  # fp32 and `export --quantize`'s CPU values


def kind(name: str) -> str:
    """The engine's family: "transformers", "optimum", "ctranslate2", "llamacpp" or "ours"."""
    return name if name in ("transformers", "optimum") else name.split("-", 1)[0]


def unavailable(name: str) -> str | None:
    """Why `name` cannot run in this Python (a missing package, an unknown variant), or None."""
    from importlib.util import find_spec

    k, variant = kind(name), name.partition("-")[2]
    need = {"transformers": ("transformers", "--"), "optimum": ("optimum.onnxruntime", "--"),
            "ctranslate2": ("ctranslate2", "--with-ctranslate2"), "llamacpp": ("llama_cpp", "--with-llama-cpp")}
    if k == "ctranslate2" and variant not in CT2_TYPES:
        return f"unknown CTranslate2 type {variant!r}; choose from {', '.join(CT2_TYPES)}"
    if k in need:
        module, flag = need[k]
        try:
            found = find_spec(module) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            return (f"{module} is not installed in {sys.executable}; "
                    f"{SETUP}{'' if flag == '--' else ' ' + flag} installs it")
    if k == "llamacpp":
        import llama_cpp

        if variant != "f32" and not hasattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{variant.upper()}"):
            return f"llama.cpp has no LLAMA_FTYPE_MOSTLY_{variant.upper()} (try f32, f16, q8_0, q4_0, q4_k_m)"
        if not (LLAMA_CPP / "convert_hf_to_gguf.py").is_file():
            return f"llama.cpp's convert_hf_to_gguf.py is not in {LLAMA_CPP}; {SETUP} --with-llama-cpp puts it there"
    if k == "ours":
        try:
            runs = ours(name, "shared", "last")
        except IndexError:
            runs = [("", "", "")]
        if any(q not in OURS_QUANTS or kv not in ("concat", "shared") for q, kv, _ in runs):
            return (f"unknown engine; ours-<quant> takes {', '.join(OURS_QUANTS)} (optionally -concat, or "
                    f"ours-fp32-spec-<quant>)")
    elif k not in need:
        return f"unknown engine; choose from {', '.join(ENGINES)} or ours-<quant>, ctranslate2-<type>, llamacpp-<type>"
    return None


def prompt_ids(batch: int, length: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).tolist()


# ---------------------------------------------------------------------------------- preparing the checkpoint

def export_dir(work: Path, opset: int, quant: str, logits: str, kv_cache: str = "concat") -> Path:
    return work / (f"onnx{opset}-{quant}" + ("" if logits == "all" else "-" + logits.replace(":", ""))
                   + ("-shared" if kv_cache == "shared" else ""))


def ours(name: str, kv_cache: str, logits: str) -> list[tuple[str, str, str]]:
    """The exports an engine runs, as (quant, kv_cache, logits): "ours-int8" -> [("int8", kv_cache, logits)];
    "ours-fp32-concat" -> the standard graph, for before/after; "ours-fp32-spec-int8" -> the fp32 target keeping
    SPECULATE + 1 logits positions, then its int8 draft, both with the concat cache (batches speculate too)."""
    parts = name.split("-")
    if parts[2:3] == ["spec"]:
        return [("fp32", "concat", f"last:{SPECULATE + 1}"), (parts[3], "concat", logits)]
    return [(parts[1], parts[2] if len(parts) > 2 else kv_cache, logits)]


def peer_path(work: Path, name: str) -> Path:
    """Where a CTranslate2 model folder or a GGUF file of `name` lives."""
    return work / (f"ct2-{name.split('-', 1)[1]}" if kind(name) == "ctranslate2" else
                   f"gguf/model-{name.split('-', 1)[1]}.gguf")


def quantize_gguf(src: Path, out: Path, ftype: str, threads: int = 2) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    params.nthread = threads
    # llama.cpp logs a line per tensor to fd 2: kept in a file, shown if the quantization fails
    import tempfile

    with tempfile.TemporaryFile() as logf:
        saved = os.dup(2)
        os.dup2(logf.fileno(), 2)
        try:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        if rc != 0:
            logf.seek(0)
            raise SystemExit(f"llama_model_quantize {src} -> {out} ({ftype}) failed (status {rc}):\n"
                             f"{logf.read().decode(errors='replace')[-3000:]}")


def prepare(work: Path, engines: list[str], project_python: str, opset: int, logits: str, kv_cache: str, log) -> None:
    """The HF folder (random 124M, seed 0), and the exports `engines` need (ours, optimum's); each made once."""
    hf = work / "hf"
    if not (hf / "config.json").is_file():
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        log(f"writing a random GPT-2 124M checkpoint (torch seed 0) to {hf}")
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config()).save_pretrained(hf)
    peers = [e for e in engines if kind(e) in ("ctranslate2", "llamacpp")]
    if peers and not (hf / "tokenizer.json").is_file():  # both converters read the tokenizer
        log(f"writing GPT-2's tokenizer files (from gpt2.tiktoken) to {hf} with {project_python}")
        subprocess.run([project_python, "-m", "export.hf_tokenizer", str(hf)], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    cfg = json.loads((hf / "config.json").read_text())
    if peers and "n_ctx" not in cfg:  # llama.cpp's GPT-2 converter reads n_ctx, as the hub's gpt2 config has it
        tmp = hf / ".config.json.tmp"  # atomic: a crash leaves the old config, which the next run fixes
        tmp.write_text(json.dumps({**cfg, "n_ctx": cfg["n_positions"]}, indent=2) + "\n")
        os.replace(tmp, hf / "config.json")
    for name in peers:
        out = peer_path(work, name)
        if out.exists():
            continue
        if kind(name) == "ctranslate2":
            import ctranslate2

            log(f"converting with CTranslate2 {ctranslate2.__version__} ({CT2_TYPES[name.split('-', 1)[1]]}) to {out}")
            ctranslate2.converters.TransformersConverter(str(hf)).convert(
                str(out), quantization=CT2_TYPES[name.split("-", 1)[1]])
            continue
        f32 = peer_path(work, "llamacpp-f32")
        if not f32.is_file():
            log(f"converting to GGUF (f32) with {LLAMA_CPP / 'convert_hf_to_gguf.py'} to {f32}")
            f32.parent.mkdir(parents=True, exist_ok=True)
            r = subprocess.run([sys.executable, str(LLAMA_CPP / "convert_hf_to_gguf.py"), str(hf), "--outtype",
                                "f32", "--outfile", str(f32)], capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"convert_hf_to_gguf.py failed (exit status {r.returncode}):\n{r.stderr[-3000:]}")
        if out != f32:
            log(f"quantizing {f32.name} to {out.name} with llama_model_quantize (its default tensor types)")
            quantize_gguf(f32, out, name.split("-", 1)[1])
    for q, kv, lg in [x for e in engines if e.startswith("ours-") for x in ours(e, kv_cache, logits)]:
        out = export_dir(work, opset, q, lg, kv)
        if (out / "model.onnx").is_file():
            continue
        log(f"exporting ours ({q}) to {out} with {project_python}")
        # random weights give flat logits: a variant's agreement with fp32 is recorded, not gated (fidelity is
        # judged on the trained model by `nanogpt-deploy verify`)
        extra = [] if q == "fp32" else ["--quantize", q, "--no-gate"]
        subprocess.run([project_python, "-m", "runtime.cli", "export", str(hf), "--out", str(out), "--opset",
                        str(opset),
                        "--logits", lg, "--kv-cache", kv, *extra],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    opt = work / "optimum"
    if "optimum" in engines and not (opt / "model.onnx").is_file():
        from optimum.onnxruntime import ORTModelForCausalLM

        log(f"exporting with optimum (export=True, use_cache=True) to {opt}")
        ORTModelForCausalLM.from_pretrained(hf, export=True, use_cache=True).save_pretrained(opt)


# ---------------------------------------------------------------------------------- one engine (worker)

class Engine:
    """generate(ids, new) -> (token ids per row, seconds to the first token, seconds of each later token)."""

    def __init__(self, name: str, work: Path, threads: int, opset: int, logits: str, kv_cache: str):
        self.name = name
        if name in ("transformers", "optimum"):
            import torch

            torch.set_num_threads(threads)
            self.torch = torch
            if name == "transformers":
                from transformers import AutoModelForCausalLM

                self.model = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32).eval()
            else:
                import onnxruntime as ort
                from optimum.onnxruntime import ORTModelForCausalLM

                so = ort.SessionOptions()
                so.intra_op_num_threads = threads
                self.model = ORTModelForCausalLM.from_pretrained(work / "optimum", use_cache=True, session_options=so,
                                                                 provider="CPUExecutionProvider")
        elif kind(name) == "ctranslate2":
            import ctranslate2

            path = peer_path(work, name)
            self.model = ctranslate2.Generator(str(path), device="cpu", compute_type=CT2_TYPES[name.split("-", 1)[1]],
                                               intra_threads=threads, inter_threads=1)
            self.vocab = json.loads((path / "vocabulary.json").read_text())  # id -> token: CT2 takes token strings
        elif kind(name) == "llamacpp":
            import llama_cpp

            # n_ctx: the 512-token prompt + 1; n_batch: a whole prompt in one decode call; flash attention, as
            # llama.cpp's own default (auto) picks on CPU: faster here (f16 TTFT@512 304 ms against 379)
            self.llm = llama_cpp.Llama(str(peer_path(work, name)), n_ctx=1024, n_batch=512, n_ubatch=512,
                                       n_threads=threads, n_threads_batch=threads, flash_attn=True, verbose=False)
            # batches: a second context on the same weights holding 8 sequences (llama-server's parallel slots),
            # each with its own 256 positions; the same thread and attention settings
            params = llama_cpp.llama_context_params.from_buffer_copy(self.llm.context_params)
            params.n_seq_max, params.n_ctx = 8, 8 * 256
            self.ctx8 = llama_cpp.llama_init_from_model(self.llm.model, params)
            self.batch8 = llama_cpp.llama_batch_init(512, 0, 8)
        else:
            sys.path.insert(0, str(ROOT))
            from runtime.backends.onnxruntime import OnnxRuntimeBackend

            paths = [export_dir(work, opset, q, lg, kv) for q, kv, lg in ours(name, kv_cache, logits)]
            # a target and its draft take turns on the cores: their threads stop spinning when a run returns
            spec = len(paths) > 1
            self.backend, *drafts = [OnnxRuntimeBackend(p, threads=threads, spinning=not spec) for p in paths]
            self.draft = drafts[0] if drafts else None

    def generate(self, ids: list[list[int]], new: int):
        if kind(self.name) == "ctranslate2":
            return self._generate_ct2(ids, new)
        if kind(self.name) == "llamacpp":
            return self._generate_llamacpp(ids, new)
        if self.name.startswith("ours"):
            from runtime.generation import SamplingParams, make_generation

            t0 = time.perf_counter()
            g = make_generation(self.backend, None, ids,
                                SamplingParams(max_new_tokens=new, temperature=0.0, stop_token_ids=()),
                                draft=self.draft, speculate=SPECULATE)
            for _ in g:
                pass
            cs = g.completions
            wall = time.perf_counter() - t0
            self.stats = getattr(g, "stats", None)
            return [c.token_ids for c in cs], cs[0].timing.ttft_s, cs[0].timing.decode_latencies_s, wall
        torch = self.torch
        x = torch.tensor(ids)
        stamps: list[float] = []

        class Stamps:  # transformers' streamer protocol: put(prompt), then put(token) per step, then end()
            def put(self, value):
                stamps.append(time.perf_counter())

            def end(self):
                pass

        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new,
                                      min_new_tokens=new, pad_token_id=VOCAB - 1, use_cache=True,
                                      streamer=Stamps() if len(ids) == 1 else None)
        wall = time.perf_counter() - t0
        tokens = out[:, x.shape[1]:].tolist()
        if len(ids) > 1:
            return tokens, None, [], wall
        steps = stamps[1:]  # stamps[0]: the prompt
        return tokens, steps[0] - t0, [b - a for a, b in zip(steps, steps[1:])], wall

    def _generate_ct2(self, ids: list[list[int]], new: int):
        # min_length: the end token is masked until `new` tokens, as transformers' min_new_tokens; greedy (top 1)
        prompts = [[self.vocab[i] for i in row] for row in ids]
        kw = {"max_length": new, "min_length": new, "sampling_topk": 1}
        t0 = time.perf_counter()
        if len(ids) > 1:
            res = self.model.generate_batch(prompts, include_prompt_in_result=False, **kw)
            return [r.sequences_ids[0] for r in res], None, [], time.perf_counter() - t0
        tokens, stamps = [], []
        for step in self.model.generate_tokens(prompts[0], **kw):
            stamps.append(time.perf_counter())
            tokens.append(step.token_id)
        return [tokens], stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])], time.perf_counter() - t0

    def _generate_llamacpp(self, ids: list[list[int]], new: int):
        import llama_cpp
        import numpy as np

        if len(ids) > 1:
            return self._generate_llamacpp_batch(ids, new)

        llm, tokens, stamps = self.llm, [], []
        llm.reset()  # the next eval drops every cached position: a fresh prefill each run
        t0 = time.perf_counter()
        llm.eval(ids[0])
        while True:
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
            tokens.append(int(logits.argmax()))  # greedy over fp32 logits, as ours; never stops on EOS
            stamps.append(time.perf_counter())
            if len(tokens) == new:
                break
            llm.eval(tokens[-1:])
        return [tokens], stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])], time.perf_counter() - t0

    def _generate_llamacpp_batch(self, ids: list[list[int]], new: int):
        """Rows as sequences 0..B-1 of one context: the prompts in one llama_decode (each row's last position
        returns logits), then one llama_decode of B tokens per step."""
        import llama_cpp
        import numpy as np

        ctx, batch, n_vocab = self.ctx8, self.batch8, self.llm.n_vocab()
        if len(ids) > 8 or sum(map(len, ids)) > 512 or max(map(len, ids)) + new > 256:
            raise ValueError(f"llama.cpp batch context holds 8 rows of 256 positions, 512 prompt tokens a step; "
                             f"got {len(ids)} rows of {max(map(len, ids))} + {new}")

        def decode(rows: list[tuple[int, list[int], int]]) -> list[int]:
            """(row, tokens, first position) each; returns each row's greedy next token."""
            n, outs = 0, []
            for row, toks, pos in rows:
                for j, t in enumerate(toks):
                    batch.token[n], batch.pos[n], batch.n_seq_id[n] = t, pos + j, 1
                    batch.seq_id[n][0], batch.logits[n] = row, j == len(toks) - 1
                    n += 1
                outs.append(n - 1)
            batch.n_tokens = n
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError(f"llama_decode failed on a batch of {n} tokens")
            return [int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax())
                    for i in outs]

        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        t0 = time.perf_counter()
        tokens = [[t] for t in decode([(r, row, 0) for r, row in enumerate(ids)])]
        for step in range(1, new):
            nxt = decode([(r, [toks[-1]], len(ids[r]) + step - 1) for r, toks in enumerate(tokens)])
            for toks, t in zip(tokens, nxt):
                toks.append(t)
        return tokens, None, [], time.perf_counter() - t0


WORKLOADS = {  # name -> (batch, prompt length, new tokens, prompt seed)
    "batch1": (1, 32, 128, 0),
    "ttft512": (1, 512, 1, 1),
    "batch8": (8, 32, 128, 2),
}


def peak_rss_mb() -> float:
    """This process's RSS high-water mark (VmHWM: unlike ru_maxrss, not inherited from the parent across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(name: str, work: Path, threads: int, opset: int, logits: str, kv_cache: str) -> None:
    """Load one engine, then serve the parent: one JSON line in (a workload name), one JSON line out (its timing)."""
    t0 = time.perf_counter()
    engine = Engine(name, work, threads, opset, logits, kv_cache)
    print(json.dumps({"engine": name, "load_s": time.perf_counter() - t0, "versions": versions(name)}), flush=True)
    prompts = {k: prompt_ids(b, p, seed) for k, (b, p, n, seed) in WORKLOADS.items()}
    for line in sys.stdin:
        workload = json.loads(line)
        tokens, ttft, lat, wall = engine.generate(prompts[workload], WORKLOADS[workload][2])
        print(json.dumps({"tokens": tokens, "ttft_s": ttft, "latencies_s": lat, "wall_s": wall,
                          "peak_rss_mb": peak_rss_mb(), "speculative": getattr(engine, "stats", None)}), flush=True)


def summarize(name: str, runs: dict, load: dict) -> dict:
    """Medians over the timed runs of each workload."""
    med = statistics.median
    b1, long, b8 = (runs[w] for w in ("batch1", "ttft512", "batch8"))
    return {**load, "tokens": b1[-1]["tokens"][0], "tokens_b8": b8[-1]["tokens"],
            "ttft32_ms": med(r["ttft_s"] for r in b1) * 1e3,
            "decode_tok_s": med(len(r["latencies_s"]) / sum(r["latencies_s"]) for r in b1),
            "latency_p50_ms": med(statistics.median(r["latencies_s"]) for r in b1) * 1e3,
            "e2e_tok_s": med(128 / r["wall_s"] for r in b1),
            # one generate call of one new token: prefill + sampling + the loop's setup, as a user sees it
            "ttft512_ms": med(r["wall_s"] for r in long) * 1e3,
            "batch8_tok_s": med(8 * 128 / r["wall_s"] for r in b8),
            "peak_rss_mb": max(r["peak_rss_mb"] for rs in (b1, long, b8) for r in rs),
            # speculative engines: guesses accepted, decode tokens per target step (of a row), batch 1 and 8
            **({k + sfx: med(r["speculative"][k] for r in rs) for sfx, rs in (("", b1), ("_b8", b8))
                for k in ("acceptance", "tokens_per_target_step")} if b1[-1].get("speculative") else {})}


def versions(name: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    pkgs = {"transformers": ("torch", "transformers"), "optimum": ("onnxruntime", "optimum-onnx", "transformers"),
            "ctranslate2": ("ctranslate2",), "llamacpp": ("llama_cpp_python",)}
    out = {}
    for p in pkgs.get(kind(name), ("onnxruntime",)):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "?"
    if kind(name) == "llamacpp":  # the CPU features the build uses
        import llama_cpp

        out["llama.cpp system info"] = llama_cpp.llama_print_system_info().decode().strip(" |")
    return out


# ---------------------------------------------------------------------------------- report

def machine(load_before) -> dict:
    import platform

    cpu = platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()]}


def format_table(report: dict) -> str:
    res = {r["engine"]: r for r in report["results"]}
    tf, opt = res.get("transformers"), res.get("optimum")
    ratio = lambda r, base, k: f"{r[k] / base[k]:.2f}x" if base and base.get(k) and r.get(k) else "-"  # noqa: E731
    head = ("engine", "decode tok/s", "vs transformers", "vs optimum", "e2e tok/s", "TTFT@32 ms", "TTFT@512 ms",
            "TTFT@512 speedup", "batch8 tok/s", "b8 vs tf", "peak RSS MB", "tokens = tf (b1 / b8)")
    lines = []
    for name, r in res.items():
        same = "-" if not tf or name == "transformers" else " / ".join(
            _same(r.get(k), tf.get(k)) for k in ("tokens", "tokens_b8"))
        lines.append((name, f"{r['decode_tok_s']:.1f}", ratio(r, tf, "decode_tok_s"), ratio(r, opt, "decode_tok_s"),
                      f"{r['e2e_tok_s']:.1f}", f"{r['ttft32_ms']:.1f}", f"{r['ttft512_ms']:.0f}",
                      f"{tf['ttft512_ms'] / r['ttft512_ms']:.2f}x" if tf else "-",
                      "-" if r["batch8_tok_s"] is None else f"{r['batch8_tok_s']:.1f}",
                      ratio(r, tf, "batch8_tok_s"), f"{r['peak_rss_mb']:.0f}", same))
    widths = [max(len(str(x[i])) for x in [head] + lines) for i in range(len(head))]
    def fmt(cells):
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [fmt(head)] + [fmt(ln) for ln in lines]
    for name, r in res.items():
        if "acceptance" in r:
            out.append(f"{name}: {r['acceptance']:.1%} of guesses accepted, {r['tokens_per_target_step']:.2f} tokens "
                       f"per target step at batch 1; {r['acceptance_b8']:.1%}, "
                       f"{r['tokens_per_target_step_b8']:.2f} per "
                       f"row at batch 8")
    for g in report["goals"]:
        out.append(f"goal {g['goal']}: {g['ratio']:.2f}x -> {'met' if g['met'] else 'NOT met'}"
                   if g["ratio"] is not None else f"goal {g['goal']}: not measured")
    m = report["machine"]
    out.append(f"[{m['cpu']}, {m['cores']} cores, {report['threads']} threads, ours: opset {report['opset']}, logits "
               f"{report.get('logits', 'all')}, kv_cache {report.get('kv_cache', 'concat')}; load {m['load_before']} "
               f"-> {m['load_after']}]")
    return "\n".join(out)


def _same(ours, theirs) -> str:
    """"yes" when the token ids are equal, else where they first differ ("row 3 at 17")."""
    if ours is None or theirs is None:
        return "-"
    if ours == theirs:
        return "yes"
    if ours and isinstance(ours[0], list):  # a batch
        row = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        return f"row {row} at {next(i for i, (a, b) in enumerate(zip(ours[row], theirs[row])) if a != b)}"
    return f"at {next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)}"


def check_goals(results: list[dict]) -> list[dict]:
    res = {r["engine"]: r for r in results}
    out = []
    for engine, key, base, need in GOALS:
        r, b = res.get(engine), res.get(base)
        ratio = r[key] / b[key] if r and b and r[key] and b[key] else None
        out.append({"goal": f"{engine} {key} >= {need}x {base}", "ratio": ratio,  # met None: an engine did not run
                    "met": None if ratio is None else ratio >= need})
    r, b = res.get("ours-fp32"), res.get("transformers")
    ratio = b["ttft512_ms"] / r["ttft512_ms"] if r and b else None  # > 1: ours is faster
    out.append({"goal": "ours-fp32 TTFT@512 no worse than transformers (speed ratio >= 1)", "ratio": ratio,
                "met": None if ratio is None else ratio >= 1.0})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default=str(ROOT / "out" / "peers"), help="checkpoint and exports (made once)")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {','.join(ENGINES)}")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for every engine (default 2)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement; medians (default 5)")
    p.add_argument("--opset", type=int, default=23,
                   help="our exports' opset (default 23: SDPA becomes one ONNX Attention node; 18 is the "
                        "export default)")
    p.add_argument("--logits", choices=("all", "last"), default="last",  # a speculative target keeps SPECULATE + 1
                   help="our exports' logits (default last: the last position only, faster time to first token, as "
                        "transformers' generate computes in prefill; all: every position, the export default)")
    p.add_argument("--kv-cache", choices=("concat", "shared"), default="shared",
                   help="our exports' KV cache (default shared: updated in place by GroupQueryAttention; the "
                        "ours-fp32-concat engine always runs the standard concat graph, for before/after)")
    p.add_argument("--project-python", default=str(ROOT / ".venv" / "bin" / "python"),
                   help="the project's Python, used to export (needs torch + onnxscript)")
    p.add_argument("--settle-s", type=float, default=0.5,
                   help="idle seconds before each measurement, so the engine that ran before has stopped spinning "
                        "its threads (default 0.5; 0 measures back to back)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON document")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    work = Path(args.work)
    if args.worker:
        run_worker(args.worker, work, args.threads, args.opset, args.logits, args.kv_cache)
        return 0

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    engines = [e for e in args.engines.split(",") if e]
    skipped = {e: why for e in engines if (why := unavailable(e))}
    if unknown := [f"{e}: {why}" for e, why in skipped.items() if why.startswith("unknown")]:
        p.error("; ".join(unknown))  # a typo is an error, not a run that quietly leaves an engine out
    for e, why in skipped.items():
        log(f"skipping {e}: {why}")
    engines = [e for e in engines if e not in skipped]
    if not engines:
        p.error("no engine can run; see the lines above")
    prepare(work, engines, args.project_python, args.opset, args.logits, args.kv_cache, log)
    load_before = [round(x, 2) for x in os.getloadavg()]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false")
    # every engine in its own process, all loaded at once and driven in turns: each round runs each workload on
    # each engine back to back, so a change in the machine's load falls on all engines alike
    workers, loads = {}, {}
    for name in engines:
        log(f"loading {name}")
        workers[name] = subprocess.Popen([sys.executable, __file__, "--worker", name, "--work", str(work), "--threads",
                                          str(args.threads), "--opset", str(args.opset), "--logits", args.logits,
                                          "--kv-cache", args.kv_cache],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True, env=env, cwd=ROOT)
        loads[name] = _reply(workers[name], name)
    runs = {name: {w: [] for w in WORKLOADS} for name in engines}
    rounds = args.warmup + args.repeats
    for r in range(rounds):
        log(f"round {r + 1}/{rounds}{' (warm-up)' if r < args.warmup else ''}, load {os.getloadavg()[0]:.2f}")
        for workload in WORKLOADS:
            for name, proc in workers.items():
                time.sleep(args.settle_s)
                proc.stdin.write(json.dumps(workload) + "\n")
                proc.stdin.flush()
                reply = _reply(proc, name)
                if r >= args.warmup:
                    runs[name][workload].append(reply)
    for proc in workers.values():
        proc.stdin.close()
        proc.wait()
    results = [summarize(name, runs[name], loads[name]) for name in engines]
    report = {"machine": machine(load_before), "threads": args.threads, "repeats": args.repeats, "opset": args.opset,
              "logits": args.logits, "kv_cache": args.kv_cache,
              "workload": {"batch1": "prompt 32, 128 new", "ttft": "prompt 512, 1 new",
                           "batch8": "8 x (prompt 32, 128 new)",
                           "sampling": "greedy, no early stop"},
              "results": results, "goals": check_goals(results), "skipped": skipped}
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        print(format_table(report))
    return 0


def _reply(proc, name: str) -> dict:
    line = proc.stdout.readline()
    while line and not line.startswith("{"):  # a library printing to stdout
        line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"{name} worker died (exit status {proc.wait()}); see its error above")
    return json.loads(line)


if __name__ == "__main__":
    sys.exit(main())
