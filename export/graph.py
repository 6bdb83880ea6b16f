"""An ONNX graph on disk, the way every export stage writes and reorders one: the helpers they share.

`save_model` puts every tensor over EXTERNAL_DATA_THRESHOLD bytes in model.onnx.data (protobuf stops at 2 GB)
with the mode a plain open() gives; `check_external_data` and `check_weight_bytes` prove what was saved;
`write_metadata` replaces the nanogpt-deploy metadata_props without rewriting the weights; `toposort` restores
the node order ONNX requires after a rewrite (fp16 Casts, fusions, the GroupQueryAttention rewrite).

    save_model(toposort(proto), Path("out/x/model.onnx")); check_external_data(Path("out/x/model.onnx"))
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from runtime.artifact import Artifact, data_path

EXTERNAL_DATA_THRESHOLD = 1024  # bytes; larger tensors live in model.onnx.data (protobuf stops at 2 GB)


class ExportError(RuntimeError):
    """An export that failed or did not validate."""


def save_model(proto, path: Path) -> None:
    """onnx.save with every tensor over EXTERNAL_DATA_THRESHOLD bytes in `path.name + '.data'`."""
    import onnx

    data = data_path(path)
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
    data, problems, n_ext, n_big_inline = data_path(path), [], 0, 0
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


def toposort(proto):
    """Reorder the main graph's nodes so each comes after the producers of its inputs (ONNX requires it)."""
    g = proto.graph
    known = {""} | {v.name for v in g.input} | {t.name for t in g.initializer}
    pending, ordered = list(g.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise ExportError(f"graph has a cycle or undefined inputs at {[n.name for n in pending[:5]]}")
        ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ids]
        for n in ready:
            known.update(n.output)
        ordered.extend(ready)
    if [id(n) for n in ordered] != [id(n) for n in g.node]:
        copies = [type(n)() for n in ordered]
        for c, n in zip(copies, ordered):
            c.CopyFrom(n)
        del g.node[:]
        g.node.extend(copies)
    return proto
