"""The parity gate: an exported graph is proven before it is published.

Structure (`check_symbolic_axes`: every batch / sequence / past axis is a symbol) and numbers (`check_parity`:
onnxruntime against torch on fresh random inputs at several (batch, sequence, past, left padding) shapes,
PARITY_ATOL). NaN or inf on either side fails: |NaN - x| is NaN, which max() and every comparison drop.
A kv_cache="shared" graph is fed the way the runtime feeds it (`run_left_aligned`). `sample_eval_ids` gives
the tokens a precision variant is judged on (export/quantize.py).

    parity = check_parity(model, Path("out/tiny/model.onnx"))   # {"atol", "max_abs_diff", "shapes": {...}}
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model import GPT
from runtime.artifact import input_names, logits_keep, output_names

from .graph import ExportError
from .trace import DEFAULT_OPSET, LOGITS_AXIS

PARITY_ATOL = 1e-4
# (batch, sequence, past, left padding of row 0): prefill, decode, chunked decode, left-padded prefill/decode;
# a model with fewer than 12 positions (block_size) is checked at these shapes fitted to it (parity_shapes)
PARITY_SHAPES = ((1, 1, 0, 0), (1, 7, 0, 0), (2, 1, 0, 0), (2, 7, 0, 0), (1, 1, 5, 0), (2, 1, 5, 0),
                 (1, 7, 5, 0), (2, 7, 5, 0), (2, 7, 0, 3), (2, 1, 5, 2))


def check_finite_weights(model: GPT) -> None:
    from model.checkpoints import CheckpointError, check_finite

    try:  # GPT.from_pretrained refuses these already; a model built or edited in memory is checked here
        check_finite(dict(model.named_parameters()), "model to export")
    except CheckpointError as e:
        raise ExportError(str(e)) from None


def check_symbolic_axes(path: Path, logits: str = "all") -> None:
    """Every batch / sequence / past axis of the saved graph's I/O is a named symbol, not a number.

    With logits="last" the logits' sequence axis must instead be the number 1; with "last:N" it is the
    symbol LOGITS_AXIS, min(sequence, N).
    """
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    fixed = []
    for v in list(m.graph.input) + list(m.graph.output):
        dims = v.type.tensor_type.shape.dim
        axes = (0, 1) if v.name in ("input_ids", "attention_mask", "position_ids", "logits") else (0, 2)
        if v.name == "logits" and logits_keep(logits) > 1 and (len(dims) < 2 or dims[1].dim_param != LOGITS_AXIS):
            fixed.append(f"logits[1]={dims[1].dim_param or dims[1].dim_value if len(dims) > 1 else 'missing'} "
                         f"(a logits={logits!r} graph must have {LOGITS_AXIS!r} there)")
        if v.name == "logits" and logits == "last":
            axes = (0,)
            if len(dims) < 2 or dims[1].dim_param or dims[1].dim_value != 1:
                got = (dims[1].dim_param or dims[1].dim_value) if len(dims) > 1 else "missing"
                fixed.append(f"logits[1]={got} (a logits=\"last\" graph must have 1 there)")
        for a in axes:
            if a >= len(dims) or not dims[a].dim_param:
                fixed.append(f"{v.name}[{a}]={dims[a].dim_value if a < len(dims) else 'missing'}")
    if fixed:
        raise ExportError(f"{path}: axes that must be symbolic are fixed: {', '.join(fixed[:8])}; "
                          f"check dynamic_shapes in export/trace.py")


def new_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own classes (InvalidGraph, Fail, NotImplemented, ...)
        raise ExportError(f"{path}: onnxruntime {ort.__version__} cannot load the exported graph "
                          f"({_opset_of(path)}): {str(e).strip()}; export with the default --opset {DEFAULT_OPSET} "
                          f"or another opset this onnxruntime runs") from e


def _opset_of(path: Path) -> str:
    import onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - only names the opset in an error message
        return "opset unknown"
    return "opset " + ", ".join(str(o.version) for o in m.opset_import if o.domain in ("", "ai.onnx"))


def parity_shapes(block_size: int, shapes=PARITY_SHAPES) -> tuple:
    """`shapes` fitted into a context of `block_size` positions: one past it has its sequence and past scaled
    down (each stays > 0 where it was) and row 0 keeps a real token; duplicates are dropped."""
    fitted = []
    for batch, seq, past, pad in shapes:
        if seq + past > block_size:
            seq = max(1, seq * block_size // (seq + past)) if past else block_size
            past = block_size - seq
        fitted.append((batch, seq, past, min(pad, seq + past - 1)))
    return tuple(dict.fromkeys(fitted))


def parity_feeds(config, batch: int, seq: int, past: int, pad: int, rng: np.random.Generator,
                 kv_dtype=np.float32) -> dict[str, np.ndarray]:
    """Random inputs for one (batch, seq, past) shape; row 0 left-padded by `pad` slots when pad > 0."""
    mask = np.ones((batch, past + seq), np.int64)
    mask[0, :pad] = 0
    pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)[:, -seq:]
    feeds = {"input_ids": rng.integers(0, config.real_vocab_size, (batch, seq), dtype=np.int64),
             "attention_mask": mask, "position_ids": pos.astype(np.int64)}
    for name in input_names(config.n_layer)[3:]:
        feeds[name] = rng.standard_normal((batch, config.n_head, past, config.head_dim)).astype(kv_dtype)
    return feeds


def run_torch(model: GPT, feeds: dict[str, np.ndarray], logits: str = "all") -> list[np.ndarray]:
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    names = input_names(model.config.n_layer)[3:]
    past = tuple((t[names[2 * i]], t[names[2 * i + 1]]) for i in range(model.config.n_layer))
    with torch.no_grad():
        out, present = model(t["input_ids"], t["attention_mask"], t["position_ids"], past,
                             logits_to_keep=logits_keep(logits))
    return [out.numpy()] + [x.numpy() for kv in present for x in kv]


def check_parity(model: GPT, path: Path, shapes=PARITY_SHAPES, atol: float = PARITY_ATOL, seed=None,
                 logits: str = "all", kv_cache: str = "concat") -> dict:
    """onnxruntime vs torch on fresh random inputs at each shape; raises naming each output's max|Δ| > atol.

    Shapes longer than the model's block_size are fitted to it (parity_shapes).

    logits="last": the graph's (B, 1, V) logits against torch's last position (a shape mismatch is an error).
    kv_cache="shared": the graph is fed the way the runtime feeds it (rows left-aligned; see
    run_left_aligned) and its outputs are compared on the real positions.

    Returns {"atol", "max_abs_diff", "shapes": {"B2xT7xP5": {"logits": d, "present": d}, ...}}.
    """
    session, rng = new_session(path), np.random.default_rng(seed)
    shapes = parity_shapes(model.config.block_size, shapes)
    names = output_names(model.config.n_layer)
    worst = dict.fromkeys(names, 0.0)
    per_shape = {}
    for batch, seq, past, pad in shapes:
        feeds = parity_feeds(model.config, batch, seq, past, pad, rng)
        want = run_torch(model, feeds, logits)
        got = session.run(None, feeds) if kv_cache == "concat" else run_left_aligned(session, feeds, want, past, logits)
        wrong = [f"{n}: onnxruntime {g.shape}, torch {w.shape}" for n, g, w in zip(names, got, want) if g.shape != w.shape]
        if wrong:
            raise ExportError(f"{path}: output shapes differ from torch's (logits={logits!r}) at B{batch}xT{seq}xP{past}: "
                              + "; ".join(wrong[:4]))
        label = f"B{batch}xT{seq}xP{past}" + (f"+pad{pad}" if pad else "")
        # NaN on either side must fail: |NaN - x| is NaN, which max() and every comparison drop, so a NaN
        # model once "validated" with max|Δ| 0.0; inf - inf is NaN too
        non_finite = [f"{n} from {side}: {_count_non_finite(x)}"
                      for n, g, w in zip(names, got, want) for side, x in (("torch", w), ("onnxruntime", g))
                      if not np.isfinite(x).all()]
        if non_finite:
            raise ExportError(f"{path}: non-finite outputs at {label} (batch, sequence, past): "
                              + "; ".join(non_finite[:6]) + (f" and {len(non_finite) - 6} more" if len(non_finite) > 6 else "")
                              + "; parity cannot be judged on NaN/inf: check the weights, and fp32 overflow of "
                                "huge activations")
        diffs = {n: float(np.max(np.abs(g.astype(np.float64) - w))) for n, g, w in zip(names, got, want)}
        for n, d in diffs.items():
            if not d <= worst[n]:  # not max(): it drops a NaN
                worst[n] = d
        per_shape[label] = {"logits": diffs["logits"], "present": max(v for k, v in diffs.items() if k != "logits")}
    bad = {n: d for n, d in worst.items() if not d <= atol}  # `not <=` also catches NaN
    if bad:
        raise ExportError(f"{path}: onnxruntime differs from torch beyond {atol:.0e}: "
                          + ", ".join(f"{n}: max|Δ|={d:.2e}" for n, d in bad.items())
                          + f" (per shape: {per_shape})")
    return {"atol": atol, "max_abs_diff": max(worst.values()), "shapes": per_shape}


def _count_non_finite(x: np.ndarray) -> str:
    nan, inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
    return f"{nan + inf} of {x.size} values {x.shape} ({nan} NaN, {inf} inf)"


def run_left_aligned(session, feeds: dict[str, np.ndarray], want: list[np.ndarray], past: int,
                     logits: str) -> list[np.ndarray]:
    """Run a kv_cache="shared" graph on left-padded `feeds` as the runtime does, with outputs in their layout.

    Its rows are left-aligned: row b's real past moves to slots [0, n_b), and a step whose new tokens
    include padding, or a multi-token step after a past (GroupQueryAttention's batch-1 case), runs row by
    row on the real tokens. Padded positions are not compared: they take `want`'s (torch's) values.
    """
    mask = feeds["attention_mask"]
    B, T = feeds["input_ids"].shape
    kv = [k for k in feeds if k.startswith("past_key_values.")]
    got = [w.copy() for w in want]
    pad_past = [int(past - mask[b, :past].sum()) for b in range(B)]  # parity_feeds pads on the left
    pad_new = [int(T - mask[b, past:].sum()) for b in range(B)]
    rows = [[b] for b in range(B)] if (any(pad_new) or (T > 1 and past)) else [list(range(B))]
    for r in rows:
        f = {"input_ids": np.stack([feeds["input_ids"][b, pad_new[b]:] for b in r]),
             "position_ids": np.stack([feeds["position_ids"][b, pad_new[b]:] for b in r])}
        f["attention_mask"] = mask[r] if len(r) > 1 else np.ones((1, past - pad_past[r[0]] + T - pad_new[r[0]]), np.int64)
        for k in kv:
            width = past if len(r) > 1 else past - pad_past[r[0]]
            f[k] = np.zeros((len(r), *feeds[k].shape[1:2], width, feeds[k].shape[3]), feeds[k].dtype)
            for j, b in enumerate(r):
                f[k][j, :, :past - pad_past[b]] = feeds[k][b, :, pad_past[b]:]
        out = session.run(None, f)
        for j, b in enumerate(r):
            n = T - pad_new[b]
            got[0][b, -min(n, got[0].shape[1]):] = out[0][j, -min(n, out[0].shape[1]):]
            for g, o in zip(got[1:], out[1:]):
                g[b, :, pad_past[b] + pad_new[b]:] = o[j, :, :past - pad_past[b] + n]
    return got


def sample_eval_ids(model: GPT, batch: int = 4, seq: int = 64, seed: int = 0) -> np.ndarray:
    """(batch, seq) tokens sampled from the model itself (temperature 1): text it finds plausible, to judge variants on."""
    seq = min(seq, model.config.block_size)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.real_vocab_size, (batch, 1), generator=g)
    with torch.no_grad():
        logits, past = model(ids)
        for _ in range(seq - 1):
            probs = torch.softmax(logits[:, -1, :model.config.real_vocab_size].float(), -1)
            nxt = torch.multinomial(probs, 1, generator=g)
            ids = torch.cat([ids, nxt], 1)
            logits, past = model(nxt, position_ids=torch.full_like(nxt, ids.size(1) - 1),
                                 attention_mask=torch.ones_like(ids), past=past)
    return ids.numpy()
