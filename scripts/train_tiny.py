"""Train the small embedded demo GPT on the standard library's own .py sources, nanoGPT style.

The corpus is on every machine with Python: the .py files under `sysconfig.get_paths()["stdlib"]`,
less site-packages, test suites and generated tables, in sorted order; a file goes to validation when
the sha256 of its relative path falls in the first `--val-percent` of 100 buckets. GPT-2 tokens
(full 50,257 vocab, <|endoftext|> between files) are cached as .npy under the project's cache dir.
The loop: AdamW (weight decay on 2D params only), linear warmup + cosine decay, gradient clipping,
periodic eval on held-out files, fixed seed, resumable from its own checkpoint (model, optimizer,
iteration and RNG states, written atomically and loadable with `torch.load(weights_only=True)`).

    python scripts/train_tiny.py                          # train, write model/weights/pycode
    python scripts/train_tiny.py --resume runs/pycode     # continue an interrupted run
    python scripts/train_tiny.py --sample model/weights/pycode --prompt "def "
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import GPT, GPTConfig  # noqa: E402
from model.checkpoints import save_model  # noqa: E402
from model.config import GPT2_EOT_TOKEN  # noqa: E402
from runtime.tokenizer import cache_dir, load_tokenizer  # noqa: E402

# test suites, docs-as-code and generated codec tables: not the Python we want the model to write
EXCLUDED_DIRS = ("site-packages", "test", "tests", "idle_test", "pydoc_data", "encodings", "__pycache__")
CKPT_NAME = "ckpt.pt"


# ---------------------------------------------------------------------------------- corpus

def list_corpus(stdlib: Path, val_percent: int) -> tuple[list[str], list[str]]:
    """Sorted relative paths of the stdlib's .py files, split into (train, val) by path hash."""
    files = sorted(str(p.relative_to(stdlib).as_posix()) for p in stdlib.rglob("*.py")
                   if not set(p.relative_to(stdlib).parts[:-1]) & set(EXCLUDED_DIRS))
    train, val = [], []
    for rel in files:
        bucket = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:4], "big") % 100
        (val if bucket < val_percent else train).append(rel)
    return train, val


def tokenize_files(stdlib: Path, files: list[str], cache: Path) -> np.ndarray:
    """GPT-2 tokens of `files`, each followed by <|endoftext|>, as uint16; cached by content hash."""
    enc = load_tokenizer()
    texts, h = [], hashlib.sha256(b"gpt2")
    for rel in files:
        data = (stdlib / rel).read_bytes()
        h.update(rel.encode() + b"\0" + data)
        texts.append(data.decode("utf-8", errors="replace"))
    path = cache / f"tokens-{h.hexdigest()[:16]}.npy"
    if path.is_file():
        return np.load(path)
    ids: list[int] = []
    for text in texts:
        ids.extend(enc.encode_ordinary(text))
        ids.append(GPT2_EOT_TOKEN)
    arr = np.asarray(ids, dtype=np.uint16)  # 50257 < 2**16
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)
    return arr


def load_corpus(args) -> tuple[torch.Tensor, torch.Tensor, dict]:
    stdlib = Path(args.stdlib or sysconfig.get_paths()["stdlib"])
    train_files, val_files = list_corpus(stdlib, args.val_percent)
    if args.max_files:  # a quick subset for tests: keep both splits non-empty
        train_files, val_files = train_files[:args.max_files], val_files[:max(1, args.max_files // 8)]
    if not train_files or not val_files:
        raise SystemExit(f"corpus split is empty (train {len(train_files)} files, val {len(val_files)}) "
                         f"under {stdlib}; check --stdlib and --val-percent")
    cache = Path(args.cache_dir) if args.cache_dir else cache_dir() / "pycode"
    train = tokenize_files(stdlib, train_files, cache)
    val = tokenize_files(stdlib, val_files, cache)
    corpus = {
        "description": "Python standard library .py sources of the training interpreter",
        "python": platform.python_version(), "implementation": platform.python_implementation(),
        "stdlib": str(stdlib), "excluded_dirs": list(EXCLUDED_DIRS),
        "split": f"val if sha256(relative path)[:4] % 100 < {args.val_percent}",
        "tokenizer": "gpt2 (tiktoken), <|endoftext|> after each file",
        "train": {"files": len(train_files), "tokens": int(train.size)},
        "val": {"files": len(val_files), "tokens": int(val.size)},
        "val_files": val_files, "train_files": train_files,
    }
    return torch.from_numpy(train.astype(np.int64)), torch.from_numpy(val.astype(np.int64)), corpus


def get_batch(data: torch.Tensor, batch_size: int, block_size: int, gen: torch.Generator):
    ix = torch.randint(data.numel() - block_size - 1, (batch_size,), generator=gen)
    x = torch.stack([data[i:i + block_size] for i in ix])  # (B, T)
    y = torch.stack([data[i + 1:i + 1 + block_size] for i in ix])
    return x, y


def eval_windows(data: torch.Tensor, n: int, block_size: int) -> torch.Tensor:
    """`n` evenly spaced windows of block_size + 1 tokens: the same ones at every eval."""
    starts = torch.linspace(0, data.numel() - block_size - 2, n).long()
    return torch.stack([data[s:s + block_size + 1] for s in starts])  # (n, T+1)


# ---------------------------------------------------------------------------------- training

def lm_loss(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits, _ = model(x)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))


@torch.no_grad()
def estimate_loss(model: GPT, windows: torch.Tensor, batch_size: int, autocast: bool) -> float:
    model.eval()
    total = 0.0
    for chunk in windows.split(batch_size):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            total += lm_loss(model, chunk[:, :-1], chunk[:, 1:]).item() * chunk.size(0)
    model.train()
    return total / windows.size(0)


def lr_at(it: int, args, time_used: float = 0.0) -> float:
    """Linear warmup, then cosine to min_lr over whichever runs out first: iterations or the time budget."""
    if it < args.warmup_iters:
        return args.lr * (it + 1) / args.warmup_iters
    progress = min(1.0, max(time_used, (it - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters)))
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


def make_optimizer(model: GPT, args) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]  # matmul weights and embeddings; not biases or LayerNorm
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2))


def save_checkpoint(path: Path, model, optimizer, it: int, gen: torch.Generator, args, log: list,
                    elapsed_s: float = 0.0) -> None:
    """Everything needed to resume, as tensors and plain containers (weights_only-loadable), atomically."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    state = {
        "model": model.state_dict(),
        "config": cfg,
        "optimizer": optimizer.state_dict(),
        "iter": it,
        "elapsed_s": elapsed_s,  # training time so far, counted against --max-minutes
        "rng": {"torch": torch.get_rng_state(), "batch": gen.get_state()},
        "args": {k: v for k, v in vars(args).items() if k not in ("resume", "sample", "prompt")},
        "log": log,
    }
    if cfg["gelu"] == "exact":  # nanoGPT's key: GPT.from_pretrained then reads this file as a nanoGPT ckpt.pt,
        # which it assumes uses exact GELU (and it takes gelu / real_vocab_size as separate arguments)
        state["model_args"] = {k: v for k, v in cfg.items() if k not in ("gelu", "real_vocab_size")}
    tmp = path / (CKPT_NAME + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path / CKPT_NAME)


# flags a resumed run may change; everything else comes from the checkpoint so the run continues unchanged
RESUME_OVERRIDABLE = ("max_minutes", "out_dir", "ckpt_dir", "cache_dir", "no_progress", "max_iters")


def train(args) -> None:
    torch.set_num_threads(args.threads)
    resume = None
    if args.resume:
        ckpt_path = Path(args.resume) / CKPT_NAME
        if not ckpt_path.is_file():
            raise SystemExit(f"--resume {args.resume}: no {CKPT_NAME} there; give the --ckpt-dir of an earlier run")
        resume = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        given = {k: getattr(args, k) for k in RESUME_OVERRIDABLE}
        explicit = {k for k in RESUME_OVERRIDABLE if getattr(args, k) != PARSER.get_default(k)}
        for k, v in resume["args"].items():
            setattr(args, k, given[k] if k in explicit else v)
        args.ckpt_dir = args.ckpt_dir if "ckpt_dir" in explicit else args.resume

    torch.manual_seed(args.seed)
    train_data, val_data, corpus = load_corpus(args)
    config = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
                       gelu=args.gelu, dropout=0.0, bias=True)
    model = GPT(config).init_weights(args.seed)
    optimizer = make_optimizer(model, args)
    gen = torch.Generator().manual_seed(args.seed)
    start_iter, log, elapsed_before = 0, [], 0.0
    if resume is not None:
        if resume["config"] != config.to_dict():
            raise SystemExit(f"--resume: checkpoint config {resume['config']} differs from {config.to_dict()}")
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        torch.set_rng_state(resume["rng"]["torch"])
        gen.set_state(resume["rng"]["batch"])
        start_iter, log, elapsed_before = resume["iter"], resume["log"], resume.get("elapsed_s", 0.0)
        log.append({"resumed_at": start_iter})
    model.train()

    tokens_per_iter = args.batch_size * args.block_size
    print(f"model: {model.num_params() / 1e6:.2f}M params ({config.n_layer} layers, n_embd {config.n_embd}, "
          f"block {config.block_size}); corpus: train {corpus['train']['files']} files / "
          f"{train_data.numel():,} tokens, "
          f"val {corpus['val']['files']} files / {val_data.numel():,} tokens; {tokens_per_iter} tokens/iter"
          + (f"; resuming at iter {start_iter}" if start_iter else ""))
    val_windows = eval_windows(val_data, args.eval_windows, args.block_size)
    train_windows = eval_windows(train_data, args.eval_windows, args.block_size)

    from tqdm import tqdm

    t0 = time.time() - elapsed_before  # the time budget spans resumed runs
    it = start_iter
    bar = tqdm(total=args.max_iters, initial=start_iter, disable=args.no_progress, dynamic_ncols=True)
    loss_ema = None
    ckpt_dir = Path(args.ckpt_dir)

    def evaluate(it):
        val_loss = estimate_loss(model, val_windows, args.batch_size, args.bf16)
        train_loss = estimate_loss(model, train_windows, args.batch_size, args.bf16)
        log.append({"iter": it, "train_loss": round(train_loss, 4), "val_loss": round(val_loss, 4),
                    "elapsed_s": round(time.time() - t0, 1)})
        bar.write(f"iter {it}: train {train_loss:.4f}, val {val_loss:.4f} (ppl {math.exp(val_loss):.1f})")

    # With --max-minutes the cosine decays over the time budget when that runs out before --max-iters,
    # so a slow (shared) machine still ends annealed; the iteration reached is recorded.
    time_used, stopped_by_time = 0.0, False
    while it < args.max_iters:
        time_used = (time.time() - t0) / (args.max_minutes * 60) if args.max_minutes else 0.0
        if time_used >= 1.0:
            stopped_by_time = True
            bar.write(f"--max-minutes {args.max_minutes} used up at iter {it} of {args.max_iters}")
            break
        if it % args.eval_interval == 0 and it > start_iter:
            evaluate(it)
        lr = lr_at(it, args, time_used)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(train_data, args.batch_size, args.block_size, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = lm_loss(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        it += 1
        loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.3f}", lr=f"{lr:.1e}")
        if it % args.ckpt_interval == 0 or it == args.max_iters:
            save_checkpoint(ckpt_dir, model, optimizer, it, gen, args, log, time.time() - t0)
    bar.close()
    evaluate(it)
    wall = time.time() - t0
    save_checkpoint(ckpt_dir, model, optimizer, it, gen, args, log, wall)

    out = Path(args.out_dir)
    save_model(model, out, dtype=torch.float16)
    final = log[-1]
    corpus["training"] = {
        "iters": it, "max_iters": args.max_iters, "stopped_by_time_budget": stopped_by_time,
        "tokens_seen": it * tokens_per_iter, "wall_s": round(wall, 1),
        "resumed_at_iters": [e["resumed_at"] for e in log if "resumed_at" in e],
        "final_train_loss": final["train_loss"], "final_val_loss": final["val_loss"],
        "final_val_ppl": round(math.exp(final["val_loss"]), 2), "params": model.num_params(),
        "machine": f"{platform.machine()}, {args.threads} torch threads, torch {torch.__version__}",
        "args": {k: v for k, v in vars(args).items() if k not in ("sample", "prompt")}, "log": log,
    }
    (out / "corpus.json").write_text(json.dumps(corpus, indent=1) + "\n")
    print(f"{it} iters ({it * tokens_per_iter:,} tokens) in {wall:.0f} s: train loss {final['train_loss']:.4f}, "
          f"val loss {final['val_loss']:.4f} (ppl {math.exp(final['val_loss']):.1f}); wrote {out}")


# ---------------------------------------------------------------------------------- sampling

def heal_prompt(enc, ids: list[int]) -> tuple[list[int], torch.Tensor | None]:
    """Token healing: drop a trailing whitespace token; the first new token must start with it, then a visible byte.

    GPT-2's BPE writes "def foo" as "def", " foo": a prompt ending in a bare " " is a state the model
    saw only inside indentation, so "def " would continue with more spaces.
    """
    if len(ids) < 2 or enc.decode_single_token_bytes(ids[-1]).strip():
        return ids, None
    tail = enc.decode_single_token_bytes(ids[-1])
    allowed = [False] * enc.n_vocab  # <|endoftext|> (the last id) stays disallowed
    for i in range(enc.n_vocab - 1):
        b = enc.decode_single_token_bytes(i)
        allowed[i] = b.startswith(tail) and b[len(tail):len(tail) + 1].strip() != b""  # tail + a visible byte
    return ids[:-1], torch.tensor(allowed)


@torch.no_grad()
def sample(model: GPT, ids: list[int], max_new_tokens: int, top_k: int, temperature: float, seed: int,
           allowed_first: torch.Tensor | None = None) -> list[int]:
    """Top-k sampling (top_k=1: greedy) with the KV cache; stops at <|endoftext|>.

    allowed_first: (vocab,) bool, the tokens the first step may pick (see heal_prompt).
    """
    g = torch.Generator().manual_seed(seed)
    block = model.config.block_size
    if len(ids) + max_new_tokens > block:
        raise SystemExit(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds block_size "
                         f"{block}; lower --max-new-tokens")
    logits, past = model(torch.tensor([ids]))
    out = []
    for _ in range(max_new_tokens):
        last = logits[0, -1].float() / max(temperature, 1e-6)
        if allowed_first is not None and not out:
            last = last.masked_fill(~allowed_first, float("-inf"))
        v, i = torch.topk(last, top_k)
        nxt = int(i[torch.multinomial(F.softmax(v, -1), 1, generator=g)])
        if nxt == GPT2_EOT_TOKEN:
            break
        out.append(nxt)
        logits, past = model(torch.tensor([[nxt]]), past=past)
    return out


def run_sample(args) -> None:
    torch.set_num_threads(args.threads)
    model = GPT.from_pretrained(args.sample)
    enc = load_tokenizer()
    for prompt in args.prompt or ["def ", "import "]:
        prompt = prompt.encode().decode("unicode_escape")  # allow "\n" in shell arguments
        ids, allowed = heal_prompt(enc, enc.encode_ordinary(prompt))
        new = sample(model, ids, args.max_new_tokens, args.top_k, args.temperature, args.seed, allowed)
        print(f"--- prompt {prompt!r}, top_k {args.top_k}, temperature {args.temperature}, seed {args.seed}")
        print(enc.decode(ids + new))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--out-dir", default=str(ROOT / "model/weights/pycode"),
      help="final fp16 model folder (config.json, model.safetensors, corpus.json)")
    a("--ckpt-dir", default=str(ROOT / "runs/pycode"), help="resumable training checkpoint folder (ckpt.pt)")
    a("--resume", help="continue from the ckpt.pt in this folder (its settings are reused)")
    a("--max-minutes", type=float, default=0, help="stop (and save) after this many minutes; 0: no limit")
    # model
    a("--n-layer", type=int, default=4)
    a("--n-head", type=int, default=4)
    a("--n-embd", type=int, default=128)
    a("--block-size", type=int, default=256)
    a("--gelu", choices=("exact", "tanh"), default="exact")
    # optimisation
    a("--batch-size", type=int, default=4)
    a("--max-iters", type=int, default=800)
    a("--lr", type=float, default=2e-3)
    a("--min-lr", type=float, default=2e-4)
    a("--warmup-iters", type=int, default=100)
    a("--weight-decay", type=float, default=0.1)
    a("--beta1", type=float, default=0.9)
    a("--beta2", type=float, default=0.99)
    a("--grad-clip", type=float, default=1.0)
    a("--bf16", action=argparse.BooleanOptionalAction, default=True,
      help="bfloat16 autocast for matmuls (fast on CPUs with AMX / AVX512-BF16)")
    a("--seed", type=int, default=1337)
    a("--threads", type=int, default=2, help="torch.set_num_threads")
    # data and evaluation
    a("--stdlib", help="stdlib folder to read (default: the running interpreter's)")
    a("--val-percent", type=int, default=5)
    a("--max-files", type=int, default=0, help="use only the first N train files (and N/8 val files): for tests")
    a("--cache-dir", help="token cache folder (default: the project's cache dir /pycode)")
    a("--eval-interval", type=int, default=100)
    a("--eval-windows", type=int, default=64, help="fixed evaluation windows per split")
    a("--ckpt-interval", type=int, default=100)
    a("--no-progress", action="store_true", help="no progress bar")
    # sampling
    a("--sample", metavar="MODEL", help="instead of training, sample from this model folder")
    a("--prompt", action="append", help="prompt for --sample (repeatable); default 'def ' and 'import '")
    a("--max-new-tokens", type=int, default=80)
    a("--top-k", type=int, default=1, help="1: greedy")
    a("--temperature", type=float, default=1.0)
    return p


PARSER = build_parser()


def main(argv=None) -> None:
    args = PARSER.parse_args(argv)
    if args.sample:
        run_sample(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
