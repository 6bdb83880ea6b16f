"""Parity of every backend and variant against the torch fp32 reference, on one checkpoint, with thresholds.

Four checks per target, each against the reference run on the same inputs:
- max |Δlogits| at the parity ladder's (batch, seq, past) shapes (past filled through the target's own cache);
- top-1 agreement at every position of a fixed prompt set and of the evaluation text;
- perplexity on the evaluation text (default: the checkpoint's held-out files, listed in its corpus.json;
  else a few of the stdlib's own modules), relative to the reference's;
- greedy generate() token identity over 128 tokens, per prompt: how many tokens match before the first
  divergence;
- batched = alone: the same greedy prompts run as one left-padded batch on the target, and how many rows
  get the tokens the target gives that prompt alone (what a server's batching must not change).
A target fails when any gated number misses its threshold (THRESHOLDS; precisions without an entry are
reported, not gated). Logits beyond `real_vocab_size` are ignored. The reference is the torch backend
on the checkpoint the fp32 export came from; without torch it is onnxruntime fp32 (noted in the report).
A target exported with `--logits last` (or `last:N`) returns only the last position(s) per call: its
per-position logits (top-1, perplexity) come from step-by-step decoding through its own KV cache, one token
per call (slower, and noted in the report), and its max|Δlogits| compares the positions it returns.

    report = verify(["out/pycode", "out/pycode-int8"], thresholds=THRESHOLDS)
    report["passed"], report["failures"]
"""
from __future__ import annotations

import json
import sysconfig
import time
from pathlib import Path

import numpy as np

# (batch, seq, past): prefill, batched prefill, decode with a cache, a chunk on a cache
SHAPES = ((1, 1, 0), (2, 7, 0), (2, 1, 5), (2, 3, 5))
# what each check requires, per precision. The top-1 and perplexity numbers are the export gate's
# (export/quantize.py THRESHOLDS, which tests/test_tools_verify.py keeps in step), except q8's top-1: its gate
# judges 256 tokens at 99%, verify (2,048+ tokens) holds it to 99.5%; fp32 must match torch.
THRESHOLDS = {
    "max_abs_diff": {"fp32": 1e-4},
    "min_top1": {"fp32": 0.999, "fp16": 0.99, "q8": 0.995, "int8": 0.95, "int4": 0.90},
    "max_ppl_change": {"fp32": 0.001, "fp16": 0.01, "q8": 0.01, "int8": 0.05, "int4": 0.10},
    "min_greedy_match": {"fp32": 1.0},
    # int8 scales activations per tensor (a row shifts with its batch) and int4's kernel computes one row
    # differently from several: reported, not gated (docs/serving.md "Batched is not alone")
    "min_batched_alone": {"fp32": 1.0, "fp16": 1.0},
}
FLAGS = {"max_abs_diff": "--max-abs-diff", "min_top1": "--min-top1", "max_ppl_change": "--max-ppl-change",
         "min_greedy_match": "--min-greedy-match", "min_batched_alone": "--min-batched-alone"}
PROMPTS = (
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n",
    "class Config:\n    def __init__(self, path):\n        self.path = ",
    "for i in range(10):\n    if i % 2 == 0:\n",
    "    return sorted(items, key=lambda x: x[1])",
    "try:\n    value = int(text)\nexcept ValueError:\n",
    "The quick brown fox jumps over the lazy dog. ",
    "with open(filename, encoding=\"utf-8\") as f:\n    for line in f:\n",
    "    @property\n    def name(self):\n        return self._name\n",
    "if __name__ == \"__main__\":\n    main()\n",
    "    raise TypeError(f\"expected str, got {type(value).__name__}\")\n",
    "def __repr__(self):\n    return f\"{self.__class__.__name__}(",
)
GREEDY_PROMPTS = 4
FALLBACK_TEXT = ("textwrap.py", "string.py", "fnmatch.py", "shlex.py")  # the stdlib's own modules


class VerifyError(ValueError):
    """A verification that cannot run as asked."""


def parse_thresholds(overrides: dict[str, list[str]] | None) -> dict:
    """THRESHOLDS updated from flag values like ["int8=0.97", "fp16=0.99"] per check."""
    out = {k: dict(v) for k, v in THRESHOLDS.items()}
    for check, items in (overrides or {}).items():
        for item in items or []:
            for part in item.split(","):
                prec, sep, value = part.partition("=")
                try:
                    if not sep or not 0 <= float(value) < float("inf"):  # nan / inf / a negative would gate nothing
                        raise ValueError
                    out[check][prec.strip()] = float(value)
                except ValueError:
                    raise VerifyError(f"{FLAGS[check]} {part!r}: expected PRECISION=NUMBER, a finite number >= 0, "
                                      f"e.g. int8=0.95") from None
    return out


# ---------------------------------------------------------------------------------- inputs

def eval_text(source: str | None, text_files: list[str] | None) -> tuple[list[str], str]:
    """(texts, where they came from): --text files, else the checkpoint's held-out files, else stdlib modules."""
    if text_files:
        return [Path(f).read_text(encoding="utf-8", errors="replace") for f in text_files], ", ".join(text_files)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = Path(source) / "corpus.json" if source and Path(source).is_dir() else None
    if corpus and corpus.is_file():
        val = [f for f in json.loads(corpus.read_text()).get("val_files", []) if (stdlib / f).is_file()]
        val.sort(key=lambda f: -(stdlib / f).stat().st_size)  # the largest held-out files
        if val:
            return [(stdlib / f).read_text(encoding="utf-8", errors="replace") for f in val[:4]], \
                f"held-out files of {corpus}: {', '.join(val[:4])}"
    files = [f for f in FALLBACK_TEXT if (stdlib / f).is_file()]
    return [(stdlib / f).read_text(encoding="utf-8", errors="replace") for f in files], \
        f"stdlib modules {', '.join(files)} (the checkpoint lists no held-out files; pass --text FILE)"


def token_windows(tokenizer, texts: list[str], config, window: int, total: int) -> tuple[list[np.ndarray], str]:
    """Windows of `window` tokens (at most `total` in all), ids folded into a smaller vocabulary if need be."""
    window = min(window, config.block_size)
    if total < window:
        raise VerifyError(f"--text-tokens {total} is less than one --window of {window} tokens; raise --text-tokens "
                          f"or lower --window")
    out, note = [], ""
    for text in texts:
        ids = np.array(tokenizer.encode_ordinary(text), dtype=np.int64)
        for i in range(0, len(ids) - window + 1, window):
            if sum(w.size for w in out) + window > total:
                break
            out.append(ids[i:i + window])
    if not out:
        raise VerifyError(f"the evaluation text has fewer than {window} tokens; pass a longer --text file")
    if config.real_vocab_size < 50257:  # a test model: same text, ids folded into its vocabulary
        out = [w % config.real_vocab_size for w in out]
        note = f"ids folded into this model's vocabulary of {config.real_vocab_size} (not a GPT-2-vocabulary model)"
    return out, note


def prompt_ids(tokenizer, config) -> list[np.ndarray]:
    return [np.array(tokenizer.encode_ordinary(p), dtype=np.int64) % config.real_vocab_size for p in PROMPTS]


# ---------------------------------------------------------------------------------- measurements

def last_only(backend) -> bool:
    """Whether the backend's artifact returns only the last position(s)' logits (--logits last or last:N)."""
    art = getattr(backend, "artifact", None)
    return getattr(art, "logits", "all") != "all"


def full_logits(backend, ids: np.ndarray) -> np.ndarray:
    """Logits (T, V_real) of one unpadded sequence: one forward, or T one-token steps for a logits="last" target."""
    T = ids.size
    backend.reset(1)
    mask, pos = np.ones((1, T), np.int64), np.arange(T, dtype=np.int64)[None]
    if last_only(backend):  # each step returns its one position: decode the sequence token by token
        logits = np.concatenate([backend.forward(ids[None, t:t + 1], mask[:, :t + 1], pos[:, t:t + 1])
                                 for t in range(T)], axis=1)
    else:
        logits = backend.forward(ids[None], mask, pos)
    return logits[0, :, :backend.config.real_vocab_size].astype(np.float64)


def shape_logits(backend, batch: int, seq: int, past: int, seed: int = 0) -> np.ndarray:
    """Logits of `seq` new positions (the last one only, for a logits="last" target) after `past` positions
    went through the backend's own cache."""
    V = backend.config.real_vocab_size
    ids = np.random.default_rng(seed).integers(0, V, (batch, past + seq), dtype=np.int64)
    pos = np.tile(np.arange(past + seq, dtype=np.int64), (batch, 1))
    mask = np.ones((batch, past + seq), np.int64)
    backend.reset(batch)
    if past:
        backend.forward(ids[:, :past], mask[:, :past], pos[:, :past])
    return backend.forward(ids[:, past:], mask, pos[:, past:])[..., :V].astype(np.float64)


def nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per-position negative log-likelihood of ids[1:] under logits[:-1] (float64, stable)."""
    x = logits[:-1]
    m = x.max(-1, keepdims=True)
    logz = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[:, 0]
    return logz - x[np.arange(len(x)), ids[1:]]


def greedy_batch(backend, prompts: list[np.ndarray], new: int) -> list[list[int]]:
    """Greedy token ids of `new` tokens per prompt, the prompts run as one (left-padded) batch."""
    from ..generation import SamplingParams, generate

    cs = generate(backend, None, [p.tolist() for p in prompts],
                  SamplingParams(max_new_tokens=new, temperature=0.0, stop_token_ids=()))
    return [c.token_ids for c in cs]


def measure(backend, prompts, windows, greedy_new: int, progress=lambda msg: None) -> dict:
    """Everything verify compares, from one backend; a progress line per stage (each takes seconds to a minute on
    the 124M shape)."""
    out = {}
    progress(f"  logits at {len(SHAPES)} (batch, sequence, past) shapes")
    out["shapes"] = {f"B{b}xT{t}xP{p}": shape_logits(backend, b, t, p) for b, t, p in SHAPES}
    progress(f"  top-1 and perplexity: {len(prompts)} prompts, {len(windows)} text windows")
    out["prompts"] = [full_logits(backend, ids) for ids in prompts]
    out["windows"] = [full_logits(backend, ids) for ids in windows]
    progress(f"  greedy: {GREEDY_PROMPTS} prompts x {greedy_new} tokens alone, then as one batch")
    out["greedy"] = [greedy_batch(backend, [ids], greedy_new)[0] for ids in prompts[:GREEDY_PROMPTS]]
    out["batched"] = greedy_batch(backend, prompts[:GREEDY_PROMPTS], greedy_new)
    return out


def compare(got: dict, ref: dict, windows: list[np.ndarray]) -> dict:
    """The numbers of one target against the reference's."""
    # a logits="last" target returns (B, 1, V) per shape: compared with the reference's last position
    diffs = {k: float(np.abs(got["shapes"][k] - ref["shapes"][k][:, -got["shapes"][k].shape[1]:]).max())
             for k in ref["shapes"]}
    agree = [np.argmax(g, -1) == np.argmax(r, -1) for g, r in zip(got["prompts"] + got["windows"],
                                                                  ref["prompts"] + ref["windows"])]
    n_prompt = sum(a.size for a in agree[:len(got["prompts"])])
    ppl = float(np.exp(np.concatenate([nll(lg, ids) for lg, ids in zip(got["windows"], windows)]).mean()))
    ppl_ref = float(np.exp(np.concatenate([nll(lg, ids) for lg, ids in zip(ref["windows"], windows)]).mean()))
    matched = []
    for g, r in zip(got["greedy"], ref["greedy"]):
        k = next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), min(len(g), len(r)))
        matched.append(k)
    total = sum(len(r) for r in ref["greedy"])
    same_rows = sum(b == a for b, a in zip(got["batched"], got["greedy"]))  # the target against itself, alone
    return {
        "max_abs_diff": max(diffs.values()), "max_abs_diff_per_shape": diffs,
        "top1": float(np.concatenate(agree).mean()), "top1_positions": int(sum(a.size for a in agree)),
        "top1_prompts": float(np.concatenate(agree[:len(got["prompts"])]).mean()), "top1_prompt_positions": n_prompt,
        "ppl": ppl, "ppl_reference": ppl_ref, "ppl_change": ppl / ppl_ref - 1,
        "greedy_match": sum(matched) / total if total else 1.0, "greedy_matched_tokens": matched,
        "greedy_tokens_per_prompt": len(ref["greedy"][0]) if ref["greedy"] else 0,
        "batched_alone": same_rows / len(got["greedy"]) if got["greedy"] else 1.0, "batched_alone_rows": same_rows,
        "batched_rows": len(got["greedy"]),
    }


def failures(label: str, precision: str, m: dict, thresholds: dict) -> list[str]:
    """Human sentences for each gated number that misses its threshold."""
    out = []
    lim = thresholds["max_abs_diff"].get(precision)
    if lim is not None and not m["max_abs_diff"] <= lim:  # `not <=` also catches NaN
        worst = max(m["max_abs_diff_per_shape"], key=lambda k: m["max_abs_diff_per_shape"][k])
        out.append(f"{label}: max|Δlogits|={m['max_abs_diff']:.2e} (at {worst}) > {lim:.0e} "
                   f"({FLAGS['max_abs_diff']} {precision}={lim:g})")
    lim = thresholds["min_top1"].get(precision)
    if lim is not None and not m["top1"] >= lim:
        out.append(f"{label}: top-1 agreement {m['top1']:.2%} over {m['top1_positions']} positions < {lim:.2%} "
                   f"({FLAGS['min_top1']} {precision}={lim:g})")
    lim = thresholds["max_ppl_change"].get(precision)
    if lim is not None and not m["ppl_change"] <= lim:
        out.append(f"{label}: perplexity {m['ppl']:.3f} vs reference {m['ppl_reference']:.3f} ({m['ppl_change']:+.2%}) "
                   f"> +{lim:.2%} ({FLAGS['max_ppl_change']} {precision}={lim:g})")
    lim = thresholds["min_greedy_match"].get(precision)
    if lim is not None and not m["greedy_match"] >= lim:
        n = m["greedy_tokens_per_prompt"]
        out.append(f"{label}: greedy tokens match the reference for {m['greedy_matched_tokens']} of {n} tokens per "
                   f"prompt ({m['greedy_match']:.1%} < {lim:.1%}; {FLAGS['min_greedy_match']} {precision}={lim:g})")
    lim = thresholds["min_batched_alone"].get(precision)
    if lim is not None and not m["batched_alone"] >= lim:
        out.append(f"{label}: batched, {m['batched_alone_rows']} of {m['batched_rows']} rows get the greedy tokens "
                   f"their prompt gets alone ({m['batched_alone']:.0%} < {lim:.0%}; {FLAGS['min_batched_alone']} "
                   f"{precision}={lim:g})")
    return out


# ---------------------------------------------------------------------------------- entry point

def _no_reference(models: list[str], targets, backends) -> str:
    """Why there is no reference (a checkpoint torch runs, or an fp32 export), and the command that gives one."""
    import importlib.util

    from ..artifact import read_onnx_artifact
    from ..backends import MISSING_HINTS

    sources = []
    for t in targets:
        try:
            src = read_onnx_artifact(t.model).source if t.backend == "onnxruntime" else ""
        except Exception:  # noqa: BLE001 - only a hint: the export's recorded checkpoint
            src = ""
        if src and src not in sources:
            sources.append(src)
    ckpt = sources[0] if sources else "CHECKPOINT"
    given = " ".join(map(str, models))
    fix = (f"add the checkpoint as another MODEL (nanogpt-deploy verify {given} {ckpt}) or the folder of its fp32 "
           f"export (nanogpt-deploy export {ckpt} --out DIR)")
    if "torch" not in backends:
        why = "and --backends leaves out torch, which runs the checkpoint"
        fix = (f"add torch (--backends {','.join([*backends, 'torch'])}) with the checkpoint as another MODEL "
               f"({ckpt}), or add the folder of its fp32 export (nanogpt-deploy export {ckpt} --out DIR)")
    elif importlib.util.find_spec("torch") is None:
        why = "and torch, which runs the checkpoint, is not installed"
        fix = f"add the folder of an fp32 export, or {MISSING_HINTS['torch']} and {fix.split(' or ')[0]}"
    else:
        why = "and no checkpoint was given for torch to run"
    return (f"no reference to compare {', '.join(t.label for t in targets) or given} with: verify compares against "
            "the checkpoint (run by torch) or an fp32 export of it; there is no fp32 export among "
            f"{given} {why}; {fix}")


def verify(models: list[str], *, thresholds: dict | None = None, text_files: list[str] | None = None,
           text_tokens: int = 2048, window: int = 256, greedy_new: int = 128, threads: int | None = None,
           backends=("onnxruntime", "torch"), providers=("cpu",), tokenizer=None, progress=lambda msg: None,
           verify_weights: bool = True, tf32: bool = False) -> dict:
    """Compare every target under `models` with the torch fp32 reference; the report as a dict.

    Args:
        models: exported folders / folders of them / engines (runtime.tools.bench.find_targets), plus optionally
            the checkpoint (else the fp32 export's recorded source is the reference).
        thresholds: THRESHOLDS-shaped dict (parse_thresholds); precisions missing from a check are not gated.
        text_files: text for perplexity and top-1 (default: see eval_text).
        text_tokens, window: at most text_tokens evaluation tokens, in windows of `window` (<= block_size).
        greedy_new: greedy tokens per prompt (cut to fit block_size).
        threads: intra-op threads for every backend.
        tokenizer: a tiktoken Encoding (default: runtime.tokenizer.load_tokenizer()).
        progress: called with a line per stage.
        verify_weights: every exported target proves its model.onnx.data against the sha256 recorded at export
            before it is measured (an ArtifactError names the file otherwise); False skips the hashing.
        tf32: onnxruntime on CUDA runs fp32 MatMuls in TF32 (off by default); each target's "tf32" says which ran.
    Returns:
        {"reference", "text", "targets": [{label, precision, metrics, failures}], "failures", "passed", "notes"}
    """
    from ..artifact import read_onnx_artifact
    from ..backends import load_backend
    from .bench import BenchError, find_targets

    thresholds = thresholds or THRESHOLDS
    try:
        targets, notes = find_targets(models, backends, providers)
    except BenchError as e:
        raise VerifyError(str(e)) from None
    notes = [n for n in notes if "cuda" not in n or "cuda" in providers]
    torch_targets = [t for t in targets if t.backend == "torch"]
    others = [t for t in targets if t.backend != "torch"]
    if torch_targets:
        ref_target = torch_targets[0]
    else:
        fp32 = [t for t in others if t.backend == "onnxruntime" and t.precision == "fp32"]
        if not fp32:
            raise VerifyError(_no_reference(models, others, backends))
        ref_target, others = fp32[0], [t for t in others if t is not fp32[0]]
        notes.append(f"reference is {ref_target.label} (torch is not available): fp32 is compared with itself")
    if not others:
        raise VerifyError("nothing to compare with the reference; give an exported folder "
                          "(nanogpt-deploy export SOURCE --out DIR)")
    if tokenizer is None:
        from ..tokenizer import load_tokenizer

        tokenizer = load_tokenizer()

    t0 = time.perf_counter()
    progress(f"reference: {ref_target.label} on {ref_target.model}")
    def options(t) -> dict:  # a TensorRT engine's TF32 is built in; torch keeps its own default (off for MatMuls)
        return {"provider": t.provider, "threads": threads, "verify_weights": verify_weights,
                **({"tf32": True} if tf32 and t.backend == "onnxruntime" else {})}

    ref_backend = load_backend(ref_target.backend, ref_target.model, **options(ref_target))
    ref_tf32 = bool(getattr(ref_backend, "tf32", False))
    config = ref_backend.config
    source = getattr(ref_backend, "source", None)
    if source is None:
        source = read_onnx_artifact(ref_target.model).source
    texts, text_from = eval_text(source, text_files)
    windows, fold_note = token_windows(tokenizer, texts, config, window, text_tokens)
    if fold_note:
        notes.append(fold_note)
    prompts = prompt_ids(tokenizer, config)
    new = min(greedy_new, config.block_size - max(p.size for p in prompts[:GREEDY_PROMPTS]))
    if new < greedy_new:
        notes.append(f"greedy identity over {new} tokens (block_size {config.block_size}), not {greedy_new}")
    ref = measure(ref_backend, prompts, windows, new, progress)
    del ref_backend

    report_targets, all_failures = [], []
    for t in others:
        progress(f"{t.label} on {t.model}")
        backend = load_backend(t.backend, t.model, **options(t))
        t_tf32 = bool(getattr(backend, "tf32", False))
        if backend.config.real_vocab_size != config.real_vocab_size or backend.config.n_layer != config.n_layer:
            raise VerifyError(f"{t.model} is not the reference's model ({ref_target.model}): its config differs; "
                              f"verify the exports of one checkpoint together")
        if last_only(backend):
            notes.append(f"{t.label}: exported with --logits {backend.artifact.logits}; its top-1 and perplexity come "
                         f"from step-by-step decoding (one token per call), its max|Δlogits| from the last position(s) "
                         f"of each shape")
        m = compare(measure(backend, prompts, windows, new, progress), ref, windows)
        del backend
        fails = failures(t.label, t.precision, m, thresholds)
        all_failures += fails
        report_targets.append({"label": t.label, "backend": t.backend, "provider": t.provider, "precision": t.precision,
                               "tf32": t_tf32, "model": t.model, "metrics": m, "failures": fails})
    return {
        "reference": {"label": ref_target.label, "model": ref_target.model, "source": source, "tf32": ref_tf32},
        "text": {"from": text_from, "windows": len(windows), "tokens": int(sum(w.size for w in windows))},
        "prompts": len(PROMPTS), "greedy_prompts": GREEDY_PROMPTS, "greedy_new_tokens": new, "shapes": SHAPES,
        "thresholds": thresholds, "targets": report_targets, "failures": all_failures, "passed": not all_failures,
        "notes": notes, "seconds": time.perf_counter() - t0,
    }


def format_report(report: dict) -> str:
    head = ("target", "max|Δlogits|", "top-1", "ppl", "Δppl", "greedy match", "batched = alone", "result")
    lines = []
    for t in report["targets"]:
        m = t["metrics"]
        per = "/".join(str(k) for k in m["greedy_matched_tokens"])
        lines.append((t["label"], f"{m['max_abs_diff']:.2e}", f"{m['top1']:.2%}", f"{m['ppl']:.3f}",
                      f"{m['ppl_change']:+.2%}", f"{per} of {m['greedy_tokens_per_prompt']}",
                      f"{m['batched_alone_rows']}/{m['batched_rows']} rows", "FAIL" if t["failures"] else "ok"))
    widths = [max(len(str(x[i])) for x in [head] + lines) for i in range(len(head))]
    def fmt(cells):
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    ref = report["reference"]
    out = [f"reference: {ref['label']} ({ref['source'] or ref['model']}); perplexity on "
           f"{report['text']['tokens']} tokens "
           f"of {report['text']['from']}; top-1 over {report['prompts']} prompts + the text; greedy over "
           f"{report['greedy_prompts']} prompts x {report['greedy_new_tokens']} tokens", fmt(head)]
    out += [fmt(ln) for ln in lines]
    out += [f"  {t['label']} max|Δ| per shape: "
            + "  ".join(f"{k} {v:.1e}" for k, v in t["metrics"]["max_abs_diff_per_shape"].items())
            for t in report["targets"]]
    out += [f"note: {n}" for n in report["notes"]]
    return "\n".join(out)
