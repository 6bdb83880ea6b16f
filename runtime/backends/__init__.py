"""One backend interface for torch / onnxruntime / TensorRT; sampling and generation live above it.

Each backend owns its KV cache. `forward` appends T positions to it and returns float32 logits: of every
position, or of the last min(T, N) for a graph exported with `--logits last` (N = 1) or `last:N`
(`artifact.logits_positions(T)`). `Backend` is an abstract base class: its public methods check every
request once, for all backends, and call the backend's `_forward`, `_rewind`, ...; each backend declares
what it can do (`Capabilities`), and callers read that (`capabilities_of`) instead of probing for methods.
Choosing a backend is the three-entry table below; each module is imported only when chosen, so the
onnxruntime path never imports torch.

    backend = load_backend("onnxruntime", "out/tiny", threads=2)
    backend.reset(1); logits = backend.forward(ids, mask, pos)
    capabilities_of(backend).ragged_cache   # False for a concat graph
"""
from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass

import numpy as np

from model.config import GPTConfig


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, declared at load; generation, speculative decoding and the server read it instead of
    probing for methods."""
    device: str  # "cpu" | "cuda": where the KV cache lives
    max_context: int  # positions the cache holds: the model's block_size, or an engine's --max-seq
    max_batch: int | None = None  # rows at most (an engine's profiles); None: memory is the only limit
    ragged_cache: bool = False  # rows of different lengths without padding (kv_cache="shared"): no holes in a mask
    rewind: bool = True  # Backend.rewind: speculative decoding takes back rejected guesses
    keep_rows: bool = True  # Backend.keep_rows: finished rows leave a batch
    drop_front: bool = True  # Backend.drop_front: a running batch's cache is trimmed
    add_rows: bool = True  # Backend.add_rows: requests join a running batch


class Backend(abc.ABC):
    """The interface every backend implements, with the checks written once.

    The public methods check their arguments against the cache (check_step and friends), then call the
    subclass's `_reset` / `_forward` / `_rewind` / `_drop_front` / `_keep_rows` / `_add_rows`, which see only
    valid requests, and keep the batch size and past length (`_batch`, `_length`) up to date after them. A
    subclass cannot skip the checks: it may not override the public methods (`__init_subclass__` refuses).
    """
    config: GPTConfig
    name: str  # "onnxruntime" | "torch" | "tensorrt"
    provider: str  # e.g. "CPUExecutionProvider", "cuda", "cpu"
    precision: str  # "fp32" | "fp16" | "q8" | "int8" | "int4"
    capabilities: Capabilities
    _batch = 0  # rows in the cache (0 before the first reset)
    _length = 0  # positions in the cache (the mask's width so far)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        overridden = sorted(m for m in CHECKED_METHODS if m in vars(cls))
        if overridden:
            raise TypeError(f"{cls.__name__} overrides Backend.{', '.join(overridden)}, which check their arguments "
                            f"before any backend runs them; implement {', '.join('_' + m for m in overridden)} instead")

    @property
    def past_length(self) -> int:
        return self._length

    def reset(self, batch_size: int) -> None:
        """Drop the KV cache; the next forward starts at past length 0 with this batch size."""
        self._reset(batch_size)
        self._batch, self._length = batch_size, 0

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """(B, T) int64 ids, (B, P+T) int64 mask, (B, T) int64 positions -> logits (B, T, V) float32.

        (B, artifact.logits_positions(T), V) for a logits="last" / "last:N" graph; generation reads only the
        last position, speculative decoding the last speculate + 1.

        Appends the T new positions to the cache. A first forward, or one after the cache emptied, with
        another batch size resets to it.
        """
        ids, mask, pos = as_int64(input_ids, attention_mask, position_ids)
        B = ids.shape[0] if ids.ndim == 2 else self._batch  # check_step says what a bad shape is
        if B != self._batch:  # 0 before the first reset
            if self._length:
                raise BackendError(f"batch size changed from {self._batch} to {B} mid-sequence; call reset({B}) first")
            self.reset(B)
        check_step(self.config, ids, mask, pos, self._length)
        logits = self._forward(ids, mask, pos)
        self._length += ids.shape[1]
        return logits

    def rewind(self, length: int) -> None:
        """Keep the first `length` cached positions of every row, drop the rest (0 <= length <= past_length).

        Speculative decoding (runtime/generation/speculative.py) takes back the drafted tokens the target rejected;
        the next forward's mask is then `length` + T wide again.
        """
        if check_rewind(length, self._length):
            self._rewind(length)
            self._length = length

    def drop_front(self, n: int) -> None:
        """Drop every row's first n cached positions (0 <= n <= past_length): columns the mask leaves out in
        every row, such as the left padding of rows that have left the batch. Generation trims a running
        batch's cache with it, so rows joining over a long run do not widen it without end."""
        length = check_drop_front(n, self._length)
        if n:
            self._drop_front(n)
            self._length = length

    def keep_rows(self, rows) -> None:
        """Keep only these rows of the cache (ascending indices), in order; the batch size becomes len(rows).

        Generation drops the rows that finished, so a batch's later steps compute only the live ones.
        """
        rows = check_keep_rows(rows, self._batch)
        if len(rows) < self._batch:
            self._keep_rows(rows)
            self._batch = len(rows)

    def add_rows(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Prefill n new rows beside the cached ones and append them to the batch; returns their logits.

        (n, P) ids, (n, P) mask and positions of the new rows alone, left-padded among themselves. The
        cache's width becomes W = max(past_length, P): the rows already cached gain W - past_length masked
        positions on their left, each new row W - P (as left padding does in a batched prefill), so the next
        forward's mask is (B + n, W + T) with zeros there. The running rows' cached keys and values are
        unchanged, also when the prefill fails. A server admits requests into a running batch with it
        (Generation.admit).
        """
        ids, mask, pos = as_int64(input_ids, attention_mask, position_ids)
        B = self._batch
        width = check_add_rows(self.config, ids, mask, pos, B, self._length)
        logits = self._add_rows(ids, mask, pos, width)
        self._batch, self._length = B + ids.shape[0], width
        return logits

    # -- what each backend implements; the arguments are checked, `_batch` and `_length` still say the cache
    #    before the call (the base updates them after it returns)

    @abc.abstractmethod
    def _reset(self, batch_size: int) -> None: ...

    @abc.abstractmethod
    def _forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """C-contiguous int64 arrays that passed check_step; the batch is `_batch`."""

    @abc.abstractmethod
    def _rewind(self, length: int) -> None:
        """0 <= length < _length."""

    @abc.abstractmethod
    def _drop_front(self, n: int) -> None:
        """0 < n <= _length."""

    @abc.abstractmethod
    def _keep_rows(self, rows: list[int]) -> None:
        """Distinct ascending rows, fewer than _batch."""

    @abc.abstractmethod
    def _add_rows(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                  width: int) -> np.ndarray:
        """Checked by check_add_rows; `width` = max(_length, P), the cache's width after it. On failure the running
        rows' cache must be as it was (the base then leaves `_batch` and `_length` alone)."""


CHECKED_METHODS = ("reset", "forward", "rewind", "drop_front", "keep_rows", "add_rows")


def capabilities_of(backend) -> Capabilities:
    """`backend.capabilities`; for an object that only looks like a Backend (a test's fake, a wrapper), what its
    methods offer: the one place that asks an object which methods it has."""
    caps = getattr(backend, "capabilities", None)
    if isinstance(caps, Capabilities):
        return caps
    has = {m: callable(getattr(backend, m, None)) for m in ("rewind", "keep_rows", "drop_front", "add_rows")}
    return Capabilities(device="cpu", max_context=getattr(getattr(backend, "config", None), "block_size", 0),
                        ragged_cache=getattr(backend, "kv_cache", "concat") == "shared", **has)


def as_int64(*arrays) -> list[np.ndarray]:
    """C-contiguous int64 arrays (no copy when they already are): what every backend hands its runtime."""
    return [np.ascontiguousarray(a, dtype=np.int64) for a in arrays]


# a backend's missing dependency -> how to install it
MISSING_HINTS = {
    "onnxruntime": "pip install 'nanogpt-deploy[cpu]' (or [gpu] for CUDA)",
    "torch": "install torch (CPU build: pip install torch==2.13.0), then pip install 'nanogpt-deploy[export]'",
    "tensorrt": "pip install 'nanogpt-deploy[tensorrt]' (needs a CUDA GPU)",
    "cuda": "pip install 'nanogpt-deploy[tensorrt]' (cuda-python)",
}
# the other extras' modules, for the CLI (a subcommand that imports one of them names its extra)
MISSING_HINTS.update({name: "pip install 'nanogpt-deploy[export]'"
                      for name in ("onnx", "onnxscript", "safetensors", "tqdm")})
MISSING_HINTS.update({name: "pip install 'nanogpt-deploy[serve]'"
                      for name in ("fastapi", "uvicorn", "starlette", "h11")})
MISSING_HINTS.update({name: "pip install 'nanogpt-deploy[bench]'" for name in ("matplotlib", "psutil")})
MISSING_HINTS["huggingface_hub"] = "pip install 'nanogpt-deploy[hub]'"


class BackendError(ValueError):
    """A backend that cannot be chosen or loaded, said plainly."""


def check_step(config, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
               past_length: int) -> None:
    """The shape / range checks every backend makes before a forward (cheap: O(B*T))."""
    if input_ids.ndim != 2 or position_ids.shape != input_ids.shape:
        raise BackendError(f"input_ids {input_ids.shape} and position_ids {position_ids.shape} must both "
                           "be (batch, seq)")
    B, T = input_ids.shape
    if T == 0:
        raise BackendError("input_ids has no positions (seq 0); give at least one token")
    if attention_mask.shape != (B, past_length + T):
        raise BackendError(f"attention_mask is {attention_mask.shape}, expected (batch {B}, past "
                           f"{past_length} + seq {T})")
    if past_length + T > config.block_size:
        raise BackendError(f"past ({past_length}) + seq ({T}) = {past_length + T} positions exceeds block_size "
                           f"{config.block_size}; shorten the prompt or max_new_tokens, or reset()")
    hi, lo = int(input_ids.max()), int(input_ids.min())
    if hi >= config.vocab_size or lo < 0:
        bad = hi if hi >= config.vocab_size else lo
        raise BackendError(f"token id {bad} is outside this model's vocabulary 0..{config.vocab_size - 1}")


def check_rewind(length: int, past_length: int) -> int:
    """The check every backend's rewind makes; returns how many positions are dropped."""
    if not 0 <= length <= past_length:
        raise BackendError(f"cannot rewind the KV cache to {length} positions: it holds {past_length}; "
                           f"rewind only drops positions (0 <= length <= past_length)")
    return past_length - length


def check_drop_front(n: int, past_length: int) -> int:
    """The check every backend's drop_front makes; returns the positions left."""
    if not 0 <= n <= past_length:
        raise BackendError(f"cannot drop the first {n} positions of a KV cache holding {past_length} "
                           f"(0 <= n <= past_length)")
    return past_length - n


def check_keep_rows(rows, batch: int) -> list[int]:
    """The check every backend's keep_rows makes; returns the rows as a list of ints."""
    rows = [int(r) for r in rows]
    if not rows or rows != sorted(set(rows)) or rows[0] < 0 or rows[-1] >= batch:
        raise BackendError(f"keep_rows needs distinct ascending row indices in 0..{batch - 1}, at least "
                           f"one; got {rows}")
    return rows


def check_add_rows(config, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                   batch: int, past_length: int) -> int:
    """The check every backend's add_rows makes (on top of check_step's, for the new rows alone); returns the
    cache width after it, max(past_length, P)."""
    if not batch:
        raise BackendError("add_rows joins rows to a running batch, and this cache holds none; reset() and forward() "
                           "the rows instead")
    check_step(config, input_ids, attention_mask, position_ids, 0)
    if not np.asarray(attention_mask).any(axis=1).all():
        raise BackendError("add_rows: every new row needs at least one real token (a 1 in its attention_mask)")
    return max(past_length, input_ids.shape[1])  # within block_size: check_step bounds both


def merge_rows(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """(B, H, L, D) cached rows and (n, H, P, D) new ones -> (B + n, H, max(L, P), D), each part aligned to the
    right (zeros on the left: positions the mask leaves out), the layout add_rows promises."""
    width = max(old.shape[2], new.shape[2])
    out = np.zeros((old.shape[0] + new.shape[0], old.shape[1], width, old.shape[3]), old.dtype)
    out[:old.shape[0], :, width - old.shape[2]:] = old
    out[old.shape[0]:, :, width - new.shape[2]:] = new
    return out


def pack_rows(rows: list[int], in_place: bool = True) -> list[tuple[int, int, int]]:
    """(dst row, src row, count) runs that move `rows` (ascending) to the front, in order; consecutive rows
    move as one run. in_place: the runs move rows within one buffer, so rows already in place are skipped;
    each run's destination lies at or before its source, so running them in order never overwrites a row
    still to be read (an overlapping run needs a memmove-safe copy). Otherwise (into another buffer) every
    row is copied."""
    runs: list[tuple[int, int, int]] = []
    for dst, src in enumerate(rows):
        if in_place and dst == src:
            continue
        if runs and runs[-1][0] + runs[-1][2] == dst and runs[-1][1] + runs[-1][2] == src:
            d, s_, n = runs[-1]
            runs[-1] = (d, s_, n + 1)
        else:
            runs.append((dst, src, 1))
    return runs


BACKENDS = {
    "onnxruntime": "runtime.backends.onnxruntime:OnnxRuntimeBackend",
    "torch": "runtime.backends.torch:TorchBackend",
    "tensorrt": "runtime.backends.tensorrt:TensorRTBackend",
}


def load_backend(name: str, model: str, **options) -> Backend:
    """Open `model` (an exported folder / model.onnx, an engine, or for torch any checkpoint source)."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    if name != "onnxruntime":  # only an exported model.onnx records its weights' digest (an engine: its sidecar)
        options.pop("verify_weights", None)
        if options.pop("decode", "auto") not in ("auto", "dynamic"):
            raise BackendError(f"--decode static/graph (fixed-shape steps, CUDA graphs) is the onnxruntime backend's, "
                               f"on a --kv-cache shared export; the {name} backend decodes dynamically")
        if options.pop("tf32", False):
            raise BackendError(f"--tf32 is onnxruntime's CUDA option; the {name} backend keeps its own setting "
                               f"(a TensorRT engine's is chosen at build-engine)")
    try:
        return getattr(importlib.import_module(module), cls)(model, **options)
    except ModuleNotFoundError as e:
        dep = (e.name or "").split(".")[0]
        if dep in MISSING_HINTS:  # a dependency, not the backend module itself
            raise BackendError(f"the {name} backend needs {dep}, which is not installed; "
                               f"{MISSING_HINTS[dep]}") from None
        raise
