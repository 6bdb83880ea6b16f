"""Export a GPT to one self-describing ONNX graph with a KV cache (prefill and decode in one graph), proven right.

    from export.onnx import export_onnx
    path = export_onnx(GPT.from_pretrained("random:tiny"), "out/tiny")   # out/tiny/model.onnx
    # CLI: nanogpt-deploy export SOURCE --out DIR [--dtype fp16] [--quantize int8|int4] [--logits last]

Inputs `input_ids [batch, sequence]`, `attention_mask [batch, total_sequence]`, `position_ids
[batch, sequence]`, `past_key_values.{i}.key|value [batch, n_head, past_sequence, head_dim]`; outputs
`logits [batch, sequence, vocab]` (or `[batch, 1, vocab]` with logits="last": the last position only,
so a long prefill skips ln_f + lm_head over the prompt), `present.{i}.key|value` — the names optimum
and onnxruntime-genai use. The config, I/O
layout, tokenizer, precision, source hash, exporter versions and the parity measured at export travel
in `metadata_props`. The graph is traced in fp32, checked (symbolic axes, external data, the tied
embedding stored once), run by onnxruntime against torch at several (batch, sequence, past) shapes,
and only then renamed into DIR; a precision variant (export/quantize.py) is built from that fp32 graph
and judged against it. A failed or killed export leaves no model.onnx behind (a killed one leaves a
hidden `.export-*` folder that the next export into DIR removes); one over a previous export keeps that
one usable until the new one is complete, then swaps the folders (publish).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from model import GPT
from runtime.artifact import (KV_CACHES, Artifact, ArtifactError, input_names, logits_keep, output_names,
                              read_onnx_artifact)
from runtime import files
from runtime.files import sha256_file

from .ecosystem import TOOL_FILES, write_tool_files

MIN_OPSET = 18  # 17 yields an invalid Split with the dynamo exporter; the highest is max_opset()
DEFAULT_OPSET = 18  # >= 23 turns SDPA into ONNX Attention, which quantize_dynamic breaks
PARITY_ATOL = 1e-4
# (batch, sequence, past, left padding of row 0): prefill, decode, chunked decode, left-padded prefill/decode;
# a model with fewer than 12 positions (block_size) is checked at these shapes fitted to it (parity_shapes)
PARITY_SHAPES = ((1, 1, 0, 0), (1, 7, 0, 0), (2, 1, 0, 0), (2, 7, 0, 0), (1, 1, 5, 0), (2, 1, 5, 0),
                 (1, 7, 5, 0), (2, 7, 5, 0), (2, 7, 0, 3), (2, 1, 5, 2))
EXTERNAL_DATA_THRESHOLD = 1024  # bytes; larger tensors live in model.onnx.data (protobuf stops at 2 GB)
OURS = ("model.onnx", "model.onnx.data", *TOOL_FILES)  # model.onnx first: publish moves it in last
LOGITS_AXIS = "logits_sequence"  # the logits sequence axis of a logits="last:N" graph: min(sequence, N)


class ExportError(RuntimeError):
    """An export that failed or did not validate."""


class _FlatIO(torch.nn.Module):
    """Presents GPT.forward with the flat KV tuple the ONNX names follow (key0, value0, key1, ...)."""

    def __init__(self, model: GPT, logits_to_keep: int = 0):
        super().__init__()
        self.model = model
        self.logits_to_keep = logits_to_keep

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        logits, present = self.model(input_ids, attention_mask, position_ids, past_key_values,
                                     logits_to_keep=self.logits_to_keep)
        return (logits, *[t for kv in present for t in kv])


def example_inputs(model: GPT, batch: int = 2, seq: int = 3, past: int = 4):
    c = model.config
    dtype = model.lm_head.weight.dtype
    ids = torch.randint(0, c.real_vocab_size, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = tuple((torch.randn(batch, c.n_head, past, c.head_dim, dtype=dtype),
                torch.randn(batch, c.n_head, past, c.head_dim, dtype=dtype)) for _ in range(c.n_layer))
    return ids, mask, pos, kv


def dynamic_shapes(n_layer: int) -> dict:
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    past, total = torch.export.Dim("past_sequence"), torch.export.Dim("total_sequence")  # no Dim + Dim
    return {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past_key_values": tuple(({0: batch, 2: past}, {0: batch, 2: past}) for _ in range(n_layer)),
    }


def export_onnx(model: GPT, out_dir: str | os.PathLike, *, opset: int = DEFAULT_OPSET, dtype: str = "fp32",
                quantize: str | None = None, logits: str = "all", kv_cache: str = "concat", source: str = "",
                force: bool = False, tool_files: bool = True,
                validate: bool = True,
                eval_ids: np.ndarray | None = None, gate: bool | None = None, progress=lambda msg: None) -> Path:
    """Trace `model`, validate it, and write DIR/model.onnx (+ model.onnx.data) atomically.

    Args:
        model: the GPT to export (any dtype; it is traced in fp32).
        out_dir: folder receiving model.onnx; must be empty, new, or hold a previous export (else `force`).
        opset: ONNX opset, MIN_OPSET to max_opset() (what torch, onnx and onnxruntime here support).
        dtype: "fp32" or "fp16" (fp16 graph for GPUs, see export/quantize.py).
        quantize: None, "int8" or "int4" (CPU variants); DIR then holds the quantized graph only.
        logits: "all" (logits [batch, sequence, vocab], what other tools expect) or "last" ([batch, 1,
            vocab]: the last position only; faster prefill / time to first token, and perplexity then
            needs step-by-step decoding) or "last:N" (the last min(sequence, N) positions: a
            speculative-decoding target, runtime/speculative.py, scores N - 1 drafted tokens per step).
        kv_cache: "concat" (present = Concat(past, new): standard ONNX, runs anywhere, TensorRT included) or
            "shared" (onnxruntime's GroupQueryAttention updates one cache buffer in place: faster decode on
            onnxruntime, see export/kv_shared.py; not for TensorRT).
        source: what the model was loaded from, recorded in the metadata (a local path made absolute).
        force: write into a DIR holding unrelated files.
        tool_files: also write what optimum, transformers and onnxruntime-genai need to run DIR as it is
            (config.json, genai_config.json, tokenizer files; export/ecosystem.py).
        validate: run the onnxruntime-vs-torch parity check (fp32 gate PARITY_ATOL).
        eval_ids: (B, T) tokens to judge a variant on; default samples from the model itself.
        gate: fail a variant that misses its thresholds; default True unless the weights are random
            (flat logits make agreement meaningless; the numbers are still recorded).
        progress: called with a line per stage.
    Returns:
        the path of DIR/model.onnx.
    """
    t0 = time.perf_counter()
    check_options(opset, dtype, quantize, logits, kv_cache)
    if model.config.block_size < 7:  # example_inputs: 3 new + 4 past positions
        raise ExportError(f"block_size {model.config.block_size} is too small to export: tracing needs 7 positions "
                          f"(3 new + 4 past; distinct sizes > 1 keep the axes symbolic), so block_size >= 7")
    _check_weights_finite(model)
    out_dir = prepare_out_dir(out_dir, force)
    if model.lm_head.weight.dtype != torch.float32:
        model = copy.deepcopy(model).float()
    model = model.eval()
    files = [Path(f) for f in getattr(model, "checkpoint_files", [])]
    artifact = Artifact(config=model.config, precision="fp32", tokenizer=model.config.tokenizer, logits=logits,
                        kv_cache=kv_cache,
                        source=recorded_source(source), source_sha256=sha256_file(files[0]) if files else "",
                        versions=_versions(opset),
                        extra={"source_files": {f.name: sha256_file(f) for f in files}} if files else {})

    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
        work = Path(tmp) / "fp32" if (dtype != "fp32" or quantize) else Path(tmp)
        work.mkdir(exist_ok=True)
        path = work / "model.onnx"
        progress(f"tracing {model.config.n_layer} layers, {model.num_params() / 1e6:.1f}M parameters (opset {opset})")
        _trace_and_save(model, path, opset, artifact)
        progress("checking axes, external data and weight sizes")
        check_symbolic_axes(path, logits)
        check_external_data(path)
        check_weight_bytes(path, model.num_params() * 4)
        if kv_cache == "shared":
            import onnx

            from .kv_shared import share_kv_cache

            progress("rewriting attention into GroupQueryAttention (KV cache updated in place)")
            save_model(share_kv_cache(onnx.load(str(path)), model.config), path)
            check_weight_bytes(path, model.num_params() * 4)
        if validate:
            shapes = parity_shapes(model.config.block_size)
            progress(f"validating onnxruntime vs torch at {len(shapes)} (batch, sequence, past) shapes")
            parity = check_parity(model, path, logits=logits, kv_cache=kv_cache)
            artifact = dataclasses.replace(artifact, extra=dict(artifact.extra, parity=parity))
        write_metadata(path, artifact)

        variant = quantize or (dtype if dtype != "fp32" else None)
        if variant:
            from .quantize import build_and_check_variant

            if gate is None:
                gate = bool(files)
                if not gate:
                    progress("random weights give flat logits: variant agreement is recorded, not enforced")
            if eval_ids is None:
                progress("sampling evaluation tokens from the model")
                eval_ids = sample_eval_ids(model)
            final = Path(tmp) / "model.onnx"
            artifact = build_and_check_variant(path, final, variant, artifact, eval_ids, gate, progress)
            shutil.rmtree(work)
            write_metadata(final, artifact)
        extra = dict(artifact.extra, export_seconds=round(time.perf_counter() - t0, 2))
        final = Path(tmp) / "model.onnx"
        write_metadata(final, dataclasses.replace(artifact, extra=extra, data_sha256=data_digests(final)))
        if tool_files:
            write_tool_files(Path(tmp), artifact, progress=progress)
        publish(Path(tmp), out_dir)
    return out_dir / "model.onnx"


def check_options(opset: int, dtype: str = "fp32", quantize: str | None = None, logits: str = "all",
                  kv_cache: str = "concat") -> None:
    """export_onnx's checks of its options, cheap: the CLI runs them before it loads a checkpoint."""
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is below {MIN_OPSET}; the dynamo exporter needs --opset {MIN_OPSET} or higher")
    top, limited_by = max_opset()
    if opset > top:
        raise ExportError(f"opset {opset} is above {top}, the highest {limited_by} supports; "
                          f"choose --opset {MIN_OPSET} (the default) to {top}")
    if dtype not in ("fp32", "fp16"):
        raise ExportError(f"dtype {dtype!r} is not supported; choose fp32 or fp16")
    if quantize not in (None, "int8", "int4"):
        raise ExportError(f"quantize {quantize!r} is not supported; choose int8 or int4")
    if quantize and dtype != "fp32":
        raise ExportError(f"--quantize {quantize} starts from fp32 weights; drop --dtype {dtype}")
    try:
        logits_keep(logits)
    except ArtifactError as e:
        raise ExportError(f"{e}; choose all, last, or last:N for a speculative-decoding target") from None
    if kv_cache not in KV_CACHES:
        raise ExportError(f"kv_cache {kv_cache!r} is not supported; choose one of {', '.join(KV_CACHES)}")


@functools.cache
def max_opset() -> tuple[int, str]:
    """(the highest ai.onnx opset this install can export and load, what sets it): the least of torch's
    exporter maximum, onnx's opset and the newest operator version onnxruntime registers."""
    import onnx.defs

    limits = {f"onnx {onnx.__version__}": onnx.defs.onnx_opset_version()}
    with contextlib.suppress(ImportError, AttributeError):
        from torch.onnx._constants import ONNX_MAX_OPSET  # torch's declared maximum (2.13: 23)

        limits[f"torch {torch.__version__.split('+')[0]}'s ONNX exporter"] = ONNX_MAX_OPSET
    with contextlib.suppress(ImportError, AttributeError, ValueError):
        import onnxruntime
        from onnxruntime.capi._pybind_state import get_all_operator_schema

        limits[f"onnxruntime {onnxruntime.__version__}"] = max(
            s.since_version for s in get_all_operator_schema() if s.domain in ("", "ai.onnx"))
    name = min(limits, key=limits.get)
    return limits[name], name


def _check_weights_finite(model: GPT) -> None:
    from model.checkpoints import CheckpointError, check_finite

    try:  # load_model refuses these already; a model built or edited in memory is checked here
        check_finite(dict(model.named_parameters()), "model to export")
    except CheckpointError as e:
        raise ExportError(str(e)) from None


def recorded_source(source: str | os.PathLike) -> str:
    """`source` as the metadata records it: a local path absolute and resolved (so the torch reference loads
    that checkpoint from any directory, not whatever the relative path names there); hub names and
    random:PRESET specs as given."""
    source = os.fspath(source)
    if not source or source.startswith("random:"):
        return source
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def _trace_and_save(model: GPT, path: Path, opset: int, artifact: Artifact) -> None:
    import onnx_ir as ir

    n_layer = model.config.n_layer
    # the exporter logs a line per optional op library it does not find (torchvision::nms, ...): noise here
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    with torch.no_grad(), warnings.catch_warnings(), _log_level(registration_log, logging.ERROR):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _FlatIO(model, logits_keep(artifact.logits)), example_inputs(model), dynamo=True, opset_version=opset,
            dynamic_shapes=dynamic_shapes(n_layer), input_names=input_names(n_layer),
            output_names=output_names(n_layer), verbose=False)
    for k, v in artifact.to_metadata().items():
        program.model.metadata_props[k] = v
    if logits_keep(artifact.logits) > 1:  # the exporter names the axis "Max(0, sequence - Max(0, sequence - N))"
        logits_out = program.model.graph.outputs[0]
        logits_out.shape = ir.Shape([logits_out.shape[0], LOGITS_AXIS, logits_out.shape[2]])
    ir.save(program.model, path, external_data=path.name + ".data", size_threshold_bytes=EXTERNAL_DATA_THRESHOLD)


@contextlib.contextmanager
def _log_level(logger: logging.Logger, level: int):
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


# ---------------------------------------------------------------------------------- files

def prepare_out_dir(out_dir: str | os.PathLike, force: bool) -> Path:
    """Create DIR (or accept an empty one / one holding a previous export); refuse other contents unless force."""
    out = Path(out_dir).expanduser()
    files.recover_folder(out)  # a publish killed between its two renames: the old export comes back first
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".probe-"):
            pass
    except OSError as e:
        raise ExportError(f"cannot write to --out {out}: {e.strerror or e}; choose a writable folder") from None
    clear_temp_dirs(out)
    others = sorted(p.name for p in out.iterdir() if p.name not in OURS)
    if (out / "model.onnx").exists():
        try:
            read_onnx_artifact(out)
        except ArtifactError:
            others.insert(0, "model.onnx (not a nanogpt-deploy export)")
    if others and not force:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise ExportError(f"--out {out} holds files that are not a previous export ({shown}); "
                          f"choose an empty folder or pass --force to write model.onnx there anyway")
    return out


def clear_temp_dirs(out: Path) -> None:
    """Remove `.export-*` folders a killed export left in `out`, and the `.NAME.publish-*` / `.NAME.old-*` folders
    beside it a killed publish left (`out` exists: those hold no current export)."""
    leftovers = [*out.glob(".export-*")]
    if out.is_dir():
        leftovers += [*out.parent.glob(f".{out.name}.publish-*"), *out.parent.glob(f".{out.name}.old-*")]
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)


def publish(tmp: Path, out: Path) -> None:
    """Make the finished export in `tmp` (a `.export-*` folder inside `out`) the export at `out`.

    Into a folder with no previous export: model.onnx.data, then model.onnx, are renamed in (model.onnx last:
    its presence means done; a kill in between leaves no model.onnx).

    Over a previous export, the old one stays usable until the new one is complete: `tmp` becomes a folder
    beside `out` (`.NAME.publish-*`, with hard links to anything else `out` holds, its mode copied), and the two
    folders are exchanged in one renameat2(RENAME_EXCHANGE) call (runtime/files.exchange_paths; Linux on
    ext4, xfs, btrfs, tmpfs): at every instant `out` is the old complete folder or the new complete one, and a
    server that opened the old files keeps reading them. The old folder is then deleted. This beats a symlink
    swap, which would turn the user's folder into a link. Where the exchange is unsupported, two renames:
    `out` -> `.NAME.old-*`, the new folder -> `out`; a kill between them leaves `out` missing for a moment,
    and the next load (artifact.resolve_file) or export (prepare_out_dir) renames the old folder back
    (files.recover_folder): never a mix of old and new files. When no folder can be made beside `out` (a
    read-only parent, `out` a mount point), the files are renamed in place as into a fresh folder.
    """
    out = Path(os.path.realpath(out))  # a symlinked DIR: swap the folder it points at, keep the link
    if not (out / "model.onnx").exists():
        return _move_in(tmp, out)
    staging = out.with_name(f".{out.name}.publish-{tmp.name.rsplit('-', 1)[-1]}")
    try:
        os.rename(tmp, staging)  # the same filesystem as `out` unless `out` is a mount point
    except OSError:
        return _move_in(tmp, out)
    try:
        os.chmod(staging, out.stat().st_mode & 0o7777)
        _link_others(out, staging)
        _fsync_dir(staging)
        try:
            swapped = files.exchange_paths(staging, out)  # staging now holds the old export
        except OSError:
            swapped = False
        if swapped:
            _fsync_dir(out.parent)
            return
        backup = files.backup_name(out)
        try:
            os.rename(out, backup)
        except OSError:  # `out` itself cannot be renamed (sticky parent, bind mount): in place, as a fresh folder
            return _move_in(staging, out)
        try:
            os.rename(staging, out)
        except BaseException:
            os.rename(backup, out)
            raise
        _fsync_dir(out.parent)
        staging = backup
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_in(tmp: Path, out: Path) -> None:
    """Rename model.onnx.data, then model.onnx, from `tmp` into `out` (a stale data file of an older export goes)."""
    (out / "model.onnx").unlink(missing_ok=True)  # from here until the last rename, DIR holds no finished export
    for name in OURS[1:]:
        if (tmp / name).exists():
            os.replace(tmp / name, out / name)
        else:
            (out / name).unlink(missing_ok=True)
    os.replace(tmp / "model.onnx", out / "model.onnx")


def _link_others(out: Path, staging: Path) -> None:
    """Give `staging` what `out` holds besides an export (files kept there with --force): hard links, else copies."""
    for p in out.iterdir():
        if p.name in OURS or p.name.startswith((".export-", ".probe-")) or (staging / p.name).exists():
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.copytree(p, staging / p.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(p, staging / p.name)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _fsync_dir(path: Path) -> None:
    files._fsync(path)


def save_model(proto, path: Path) -> None:
    """onnx.save with every tensor over EXTERNAL_DATA_THRESHOLD bytes in `path.name + '.data'`."""
    import onnx

    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
              size_threshold=EXTERNAL_DATA_THRESHOLD, convert_attribute=True)
    if data.exists():  # onnx creates the data file 0o600; give it the mode open() gave model.onnx (umask, ACL)
        os.chmod(data, path.stat().st_mode & 0o777)


def check_external_data(path: Path) -> dict:
    """Every external tensor of `path` points inside its own data file, by a relative name; returns a summary."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    m = onnx.load(str(path), load_external_data=False)
    data, problems, n_ext, n_big_inline = path.with_name(path.name + ".data"), [], 0, 0
    size = data.stat().st_size if data.exists() else 0
    for t in m.graph.initializer:
        if not uses_external_data(t):
            n_big_inline += len(t.raw_data) > EXTERNAL_DATA_THRESHOLD
            continue
        n_ext += 1
        info = ExternalDataInfo(t)
        if info.location != data.name:
            problems.append(f"{t.name} -> {info.location!r} (expected {data.name!r})")
        elif info.offset + info.length > size:
            problems.append(f"{t.name}: bytes {info.offset}..{info.offset + info.length} past the end of {data.name} ({size} bytes)")
    if n_big_inline:
        problems.append(f"{n_big_inline} tensors of more than {EXTERNAL_DATA_THRESHOLD} bytes are stored inside the proto")
    if path.stat().st_size >= 2**31:
        problems.append(f"{path.name} is {path.stat().st_size} bytes, past protobuf's 2 GB limit")
    if problems:
        raise ExportError(f"{path}: invalid external data: " + "; ".join(problems[:5]))
    return {"external_tensors": n_ext, "data_bytes": size}


def check_weight_bytes(path: Path, expected: int) -> None:
    """The fp32 graph's weights take about params*4 bytes: the tied wte/lm_head is stored once."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    total = 0
    for t in m.graph.initializer:
        total += int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    if total > expected * 1.01 + 65536:
        raise ExportError(f"{path}: weights take {total / 1e6:.1f} MB, expected about {expected / 1e6:.1f} MB "
                          f"(params*4); the tied wte/lm_head weight was probably stored twice")


def write_metadata(path: Path, artifact: Artifact) -> None:
    """Replace the nanogpt-deploy metadata_props of model.onnx, leaving its external data untouched."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    keep = [(p.key, p.value) for p in m.metadata_props if not p.key.startswith("nanogpt_deploy.")]
    del m.metadata_props[:]
    for k, v in keep + list(artifact.to_metadata().items()):
        m.metadata_props.add(key=k, value=v)
    tmp = path.with_name(path.name + ".meta.tmp")
    onnx.save(m, str(tmp))  # tensors keep their external references; the data file is not rewritten
    os.replace(tmp, path)


def data_digests(path: Path) -> dict[str, str]:
    """{file name: sha256} of every external data file `path` references (`{}` when its weights are all inside it):
    recorded in the metadata (Artifact.data_sha256), so a loader can prove the weights beside it are the exported ones."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    m = onnx.load(str(path), load_external_data=False)
    names = sorted({ExternalDataInfo(t).location for t in m.graph.initializer if uses_external_data(t)})
    return {name: sha256_file(path.parent / name) for name in names}


def _versions(opset: int) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"opset": opset}
    for pkg in ("torch", "onnx", "onnxscript", "onnxruntime", "nanogpt-deploy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


# ---------------------------------------------------------------------------------- checks

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
                          f"check dynamic_shapes in export/onnx.py")


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
