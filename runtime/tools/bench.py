"""Timing the deploy path: time to first token, decode tokens/s, per-token latency, peak memory, per backend.

A *target* is one backend on one artifact (torch eager on the checkpoint, onnxruntime on each exported
variant, on CPU or CUDA, TensorRT on an engine); a *case* is one (batch, prompt length, new tokens).
Each target runs in its own fresh Python process, so its peak RSS is its own (not the previous
backend's), thread pools do not mix, and torch is imported only by the torch target. Every case is
`generate()` itself, greedy, never stopping early, on seeded random prompt ids: warm-up runs first,
then medians over repeats. The worker reports one JSON line per run (the parent's progress bar) and
one with its results.

    targets, notes = find_targets(["out/gpt2", "out/gpt2-int8"], backends=("onnxruntime", "torch"))
    report = run_bench(targets, cases([32], [128], [1, 8]), warmup=1, repeats=5, threads=2)
    plot_report(report, "bench.png")              # runtime/tools/bench_report.py: the table and the plot

    python -m runtime.tools.bench '{"target": {...}, "cases": [...], ...}'     # one worker (internal)
"""
from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..trt_plan import ENGINE_NAME, sidecar_path

BACKENDS = ("onnxruntime", "torch", "tensorrt")
PROVIDERS = ("cpu", "cuda")


class BenchError(RuntimeError):
    """A benchmark that cannot run as asked."""


@dataclass(frozen=True)
class Target:
    backend: str  # "onnxruntime" | "torch" | "tensorrt"
    model: str  # what load_backend opens
    provider: str = "cpu"
    precision: str = "fp32"
    name: str = ""  # the label, when backend/provider/precision alone would be ambiguous
    draft: str = ""  # speculative decoding: the draft export (a batch on a kv_cache="shared" pair: the target alone)
    speculate: int = 0  # guesses per round with a draft

    @property
    def label(self) -> str:
        return self.name or f"{self.backend} {self.provider} {self.precision}"


@dataclass(frozen=True)
class Case:
    batch: int
    prompt: int  # prompt tokens per row
    new: int  # generated tokens per row

    @property
    def label(self) -> str:
        return f"B{self.batch} P{self.prompt} N{self.new}"


def cases(prompt_lens, new_tokens, batches) -> list[Case]:
    return [Case(b, p, n) for b, p, n in itertools.product(batches, prompt_lens, new_tokens)]


# ---------------------------------------------------------------------------------- what to time

def find_targets(models, backends=BACKENDS, providers=PROVIDERS, draft: str | None = None,
                 speculate: int = 4) -> tuple[list[Target], list[str]]:
    """Targets for every requested backend/provider on every artifact under `models`, and notes on what was skipped.

    A model is an exported folder (its model.onnx), a folder of exported folders (one per variant), an
    engine file / folder holding model.engine (TensorRT), or, for torch, any checkpoint source. The
    torch target runs the checkpoint the first fp32 export came from. With `draft` (an exported folder),
    every onnxruntime target that keeps speculate + 1 logits positions is also timed with that draft
    (runtime/generation/speculative.py).
    """
    from ..artifact import ArtifactError, read_onnx_artifact

    for b in backends:
        if b not in BACKENDS:
            raise BenchError(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    for p in providers:
        if p not in PROVIDERS:
            raise BenchError(f"unknown provider {p!r}; choose from {', '.join(PROVIDERS)}")
    onnx, engines, checkpoints, notes = [], [], [], []
    for m in models:
        p = Path(m).expanduser()
        if p.is_file() and p.suffix in (".engine", ".plan") or (p / ENGINE_NAME).is_file():
            engines.append(str(p))
        elif p.is_file() and p.suffix == ".onnx" or (p / "model.onnx").is_file():
            onnx.append(p)
        elif p.is_dir() and (subs := sorted(q for q in p.iterdir() if (q / "model.onnx").is_file())):
            onnx += subs
            engines += [str(q) for q in sorted(p.iterdir()) if (q / ENGINE_NAME).is_file()]
        elif p.exists() or str(m).startswith("random:") or is_hub_name(str(m)):
            checkpoints.append(str(m))
        else:
            raise BenchError(f"{m} is neither an exported folder, a folder of them, an engine nor a checkpoint; "
                             f"export one with `nanogpt-deploy export SOURCE --out DIR`")
    if not (onnx or engines or checkpoints):
        raise BenchError("nothing to benchmark; give an exported folder (nanogpt-deploy export SOURCE --out DIR)")

    arts = []
    for p in onnx:
        try:
            arts.append((p, read_onnx_artifact(p)))
        except ArtifactError as e:
            notes.append(f"skipped {p}: {e}")
    arts.sort(key=lambda pa: ("fp32", "fp16", "q8", "int8", "int4").index(pa[1].precision))
    targets = []
    if "torch" in backends:
        fp32 = [str(p) for p, a in arts if a.precision == "fp32"]
        sources = checkpoints or fp32[:1]
        if importlib.util.find_spec("torch") is None:
            notes.append("torch: skipped, torch is not installed (pip install torch==2.13.0)")
        elif not sources:
            notes.append("torch: skipped, no checkpoint and no fp32 export to take the checkpoint from")
        else:
            for prov in providers:
                if prov == "cuda" and not _torch_cuda():
                    notes.append("torch cuda: skipped, torch sees no CUDA GPU")
                    continue
                targets += [Target("torch", s, prov, "fp32") for s in sources]
    if "onnxruntime" in backends and arts:
        available = _ort_providers()
        for prov in providers:
            ep = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[prov]
            if ep not in available:
                notes.append(f"onnxruntime {prov}: skipped, {ep} is not in this onnxruntime "
                             f"(pip install 'nanogpt-deploy[gpu]' on a CUDA machine)")
                continue
            for p, a in arts:
                if prov == "cpu" and a.precision == "fp16":
                    notes.append(f"onnxruntime cpu fp16: skipped {p}, fp16 graphs are for GPUs")
                    continue
                targets.append(Target("onnxruntime", str(p), prov, a.precision))
    if draft:
        targets += _speculative_targets(targets, draft, speculate, notes)
    if "tensorrt" in backends:
        if not engines:
            notes.append("tensorrt: skipped, no engine given (nanogpt-deploy build-engine MODEL_DIR --out ENGINE)")
        elif importlib.util.find_spec("tensorrt") is None:
            notes.append("tensorrt: skipped, the tensorrt package is not installed (pip install "
                         "'nanogpt-deploy[tensorrt]')")
        else:
            targets += [Target("tensorrt", e, "cuda", _engine_precision(e)) for e in engines]
    if not targets:
        raise BenchError("no backend can run here: " + "; ".join(notes))
    labels = [t.label for t in targets]
    if len(set(labels)) < len(labels):  # the same variant from two folders: name the folder too
        targets = [dataclasses.replace(t, name=f"{t.label} [{_short(t.model)}]") for t in targets]
    return targets, notes


def is_hub_name(source: str) -> bool:
    """model.checkpoints.is_hub_name, where torch is installed (that module needs it); without torch: False."""
    if importlib.util.find_spec("torch") is None:
        return False
    from model.checkpoints import is_hub_name as hub

    return hub(source)


def _speculative_targets(targets: list[Target], draft: str, speculate: int, notes: list[str]) -> list[Target]:
    from ..artifact import ArtifactError, read_onnx_artifact

    try:
        d = read_onnx_artifact(draft)
    except (ArtifactError, OSError) as e:
        raise BenchError(f"--draft {draft}: {e}") from None
    out = []
    for t in targets:
        if t.backend != "onnxruntime" or Path(t.model).resolve() == Path(draft).resolve():
            continue
        if read_onnx_artifact(t.model).logits_positions(speculate + 1) < speculate + 1:
            notes.append(f"speculative: skipped {t.label} [{_short(t.model)}], its logits keep fewer than "
                         f"{speculate + 1} positions (export it with --logits last:{speculate + 1})")
            continue
        out.append(dataclasses.replace(t, draft=str(draft), speculate=speculate,
                                       name=f"{t.label} + {d.precision} draft (K={speculate})"))
    if not out:
        notes.append(f"speculative: no target keeps {speculate + 1} logits positions; export one with "
                     f"--logits last:{speculate + 1}")
    return out


def _short(model: str) -> str:
    p = Path(model)
    p = p.parent if p.suffix in (".onnx", ".engine", ".plan") else p
    return "/".join(p.parts[-2:])


def _ort_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return ort.get_available_providers()


def _torch_cuda() -> bool:
    # in a child process: importing torch here would make the parent heavy
    code = "import torch; print(torch.cuda.is_available())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return out.stdout.strip() == "True"


def _engine_precision(engine: str) -> str:
    p = Path(engine)
    side = sidecar_path(p / ENGINE_NAME if p.is_dir() else p)
    try:
        return json.loads(side.read_text()).get("precision", "?")
    except (OSError, ValueError):
        return "?"


# ---------------------------------------------------------------------------------- the worker

def peak_rss_mb() -> float:
    """This process's resident-set high-water mark, MB.

    Linux: VmHWM of /proc/self/status; getrusage's ru_maxrss would carry the parent's RSS across fork + exec.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 1024 / (1024 if sys.platform == "darwin" else 1)  # macOS reports bytes
    except ImportError:  # Windows
        import psutil

        info = psutil.Process().memory_info()
        return getattr(info, "peak_wset", info.rss) / 2**20


def prompt_ids(case: Case, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, (case.batch, case.prompt)).tolist()


def time_case(backend, case: Case, warmup: int, repeats: int, on_run=lambda: None, draft=None,
              speculate: int | None = None) -> dict:
    """Run `case` warmup + repeats times through generate(); medians and latency percentiles.

    With a `draft`, cases decode speculatively (acceptance reported), but batches on a kv_cache="shared" pair,
    which run on the target alone (runtime.generation.draft_for).
    """
    from ..generation import SamplingParams, draft_for, make_generation

    params = SamplingParams(max_new_tokens=case.new, temperature=0.0, stop_token_ids=())
    ids = prompt_ids(case, backend.config.real_vocab_size)
    draft = draft_for(backend, draft, case.batch)
    runs, stats = [], []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        g = make_generation(backend, None, ids, params, draft, speculate)
        for _ in g:
            pass
        wall = time.perf_counter() - t0
        on_run()
        if i >= warmup:
            runs.append((g.completions[0].timing, wall))
            stats.append(getattr(g, "stats", None))
    lat = np.array([t.decode_latencies_s for t, _ in runs])  # (repeats, new - 1)
    med = lambda xs: float(np.median(xs))  # noqa: E731
    out = {"ttft_ms": med([t.ttft_s for t, _ in runs]) * 1e3,
           "prefill_ms": med([t.prefill_s for t, _ in runs]) * 1e3,
           "e2e_tok_s": med([case.batch * case.new / w for _, w in runs]),
           "repeats": repeats, "warmup": warmup}
    if draft is not None:
        out["speculative"] = {k: med([s[k] for s in stats]) for k in ("acceptance", "tokens_per_target_step")}
        # the claim speculation rests on, checked on these prompts: the target alone gives the same tokens
        plain = make_generation(backend, None, ids, params)
        for _ in plain:
            pass
        out["speculative"]["same_tokens_as_target"] = [c.token_ids for c in plain.completions] == \
            [c.token_ids for c in g.completions]
    if lat.shape[1]:
        out.update({
            "decode_tok_s": med(case.batch * lat.shape[1] / lat.sum(1)),
            "latency_p50_ms": float(np.percentile(lat, 50)) * 1e3,
            "latency_p95_ms": float(np.percentile(lat, 95)) * 1e3,
            # per decode step, the median over repeats: step i runs with prompt + i + 1 positions in the cache
            "step_latency_ms": [round(x * 1e3, 4) for x in np.median(lat, axis=0)],
        })
    return out


def run_worker(spec: dict, emit=print) -> None:
    """Load one target, time its cases, report JSON lines: {"event": "run"} per run, then the results."""
    from ..generation import GenerationError, check_context
    from ..loading import load_pair

    target, todo = Target(**spec["target"]), [Case(**c) for c in spec["cases"]]
    t0 = time.perf_counter()
    # a TensorRT engine's TF32 is built in
    tf32 = {"tf32": True} if spec.get("tf32") and target.backend == "onnxruntime" else {}
    backend, draft = load_pair(target.backend, target.model, target.draft or None, target.speculate or None,
                               provider=target.provider, threads=spec.get("threads"),
                               verify_weights=spec.get("verify_weights", True), **tf32)
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss_mb()
    results = []
    for case in todo:
        try:
            check_context(case.prompt, case.new, backend.config.block_size, fix="a case within it is timed instead")
        except GenerationError as e:
            results.append({"case": dataclasses.asdict(case), "skipped": str(e)})
            for _ in range(spec["warmup"] + spec["repeats"]):
                emit(json.dumps({"event": "run"}))
            continue
        m = time_case(backend, case, spec["warmup"], spec["repeats"], lambda: emit(json.dumps({"event": "run"})),
                      draft, target.speculate or None)
        results.append({"case": dataclasses.asdict(case), **m})
    emit(json.dumps({"event": "result", "target": dataclasses.asdict(target), "label": target.label,
                     "provider_name": backend.provider, "tf32": bool(getattr(backend, "tf32", False)),
                     "decode": backend.graph_stats() if hasattr(backend, "graph_stats") else None, "load_s": load_s,
                     "rss_after_load_mb": rss_loaded,
                     "peak_rss_mb": peak_rss_mb(), "versions": _versions(target.backend), "cases": results}))


def _versions(backend: str) -> dict:
    mods = {"onnxruntime": "onnxruntime", "torch": "torch", "tensorrt": "tensorrt"}
    mod = sys.modules.get(mods[backend])
    return {"python": platform.python_version(), "numpy": np.__version__, backend: getattr(mod, "__version__", "?")}


# ---------------------------------------------------------------------------------- the parent

def run_bench(targets: list[Target], todo: list[Case], warmup: int = 1, repeats: int = 3,
              threads: int | None = None, progress=None, verify_weights: bool = True, tf32: bool = False) -> dict:
    """Time every case on every target, each target in a fresh process; the whole report as a dict.

    Args:
        targets: from find_targets.
        todo: the cases (cases(prompt_lens, new_tokens, batches)).
        warmup, repeats: untimed and timed runs per case (medians over the timed ones).
        threads: intra-op CPU threads for every backend (None: each backend's default).
        progress: called as progress(done_runs, total_runs, label) after each run.
        verify_weights: onnxruntime targets check their weights' recorded sha256 at load (False: skip).
        tf32: onnxruntime on CUDA runs fp32 MatMuls in TF32 (off by default); each result's "tf32" says which ran.
    Returns:
        {"machine", "settings", "results": [one per target], "failed": [...], "seconds"}
    """
    total = len(targets) * len(todo) * (warmup + repeats)
    done, results, failed = 0, [], []
    t0, load0 = time.perf_counter(), _loadavg()
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    if threads:  # torch / OpenMP pools follow this too
        env["OMP_NUM_THREADS"] = str(threads)
    for target in targets:
        spec = {"target": dataclasses.asdict(target), "cases": [dataclasses.asdict(c) for c in todo],
                "warmup": warmup, "repeats": repeats, "threads": threads, "verify_weights": verify_weights,
                "tf32": tf32}
        # stderr goes to a file, not a pipe: a worker filling a stderr pipe while this loop reads stdout would hang both
        with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as errf:
            proc = subprocess.Popen([sys.executable, "-m", "runtime.tools.bench", json.dumps(spec)],
                                    stdout=subprocess.PIPE,
                                    stderr=errf, text=True, env=env)
            result = None
            for line in proc.stdout:
                if not line.startswith("{"):
                    continue  # a library printing to stdout
                msg = json.loads(line)
                if msg["event"] == "run":
                    done += 1
                    if progress:
                        progress(done, total, target.label)
                else:
                    result = msg
            proc.wait()
            errf.seek(0)
            err = errf.read()
        if proc.returncode != 0 or result is None:
            lines = [ln for ln in err.strip().splitlines() if ln.strip()]
            failed.append({"target": dataclasses.asdict(target), "label": target.label,
                           "error": lines[-1] if lines else f"exit status {proc.returncode}"})
            done = (targets.index(target) + 1) * len(todo) * (warmup + repeats)
            continue
        del result["event"]
        results.append(result)
    return {"machine": machine_info(load0, _loadavg()), "results": results, "failed": failed,
            "settings": {"warmup": warmup, "repeats": repeats, "threads": threads, "tf32": tf32,
                         "sampling": "greedy, no early stop",
                         "cases": [dataclasses.asdict(c) for c in todo]},
            "seconds": time.perf_counter() - t0}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info(load_before=None, load_after=None) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "os": platform.platform(), "python": platform.python_version(),
            "numpy": np.__version__, "load_before": load_before, "load_after": load_after}
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
    except ImportError:
        pass
    return info


if __name__ == "__main__":  # the worker: python -m runtime.tools.bench SPEC_JSON
    run_worker(json.loads(sys.argv[1]))
