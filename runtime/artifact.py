"""What an exported artifact says about itself, what its files are called, and how to prove they belong together.

The one home of artifact knowledge, shared by export/ (which writes it) and runtime/ (which reads it):
- the schema: a `model.onnx` carries, in its `metadata_props`, everything the runtime needs (`Artifact`: the
  GPTConfig, the I/O names and layout, the tokenizer name, the precision, where it came from and what built
  it); a TensorRT engine's JSON sidecar (runtime/trt_plan.py's `EngineMeta`) wraps one. Both are a `Record`:
  a frozen dataclass with a format tag and a JSON round-trip;
- the names: ONNX_NAME and its data file (`data_path`), ENGINE_NAME and its sidecar (`sidecar_path`), and
  `resolve_onnx` / `resolve_engine` (a folder or the file -> the file, or an error saying how to make one);
- the digests: `data_digests` computes at export what `check_weights` verifies at load.
Pure Python: no torch, no onnx (the metadata is read from the protobuf wire format, `onnx_metadata`).

    art = Artifact(config=cfg, precision="fp32"); props = art.to_metadata()
    Artifact.from_metadata(props, where="model.onnx") == art
"""
from __future__ import annotations

import copy
import dataclasses
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from model.config import GPTConfig

FORMAT = "nanogpt-deploy/1"
PREFIX = "nanogpt_deploy."
PRECISIONS = ("fp32", "fp16", "q8", "int8", "int4")
# which positions the `logits` output holds: "all" -> (batch, sequence, vocab); "last" -> (batch, 1, vocab),
# the last position only (faster prefill; generation reads nothing else); "last:N" -> the last min(sequence, N)
# positions (a speculative-decoding target scores N - 1 drafted tokens in one step and still prefills cheaply).
# Artifacts older than the field: "all".
LOGITS = ("all", "last", "last:N")
MAX_LOGITS_KEEP = 64


def logits_keep(logits: str) -> int:
    """A logits mode -> how many trailing positions it keeps: 0 for "all", 1 for "last", N for "last:N".

    Raises ArtifactError for anything else ("last:N" needs 2 <= N <= MAX_LOGITS_KEEP).
    """
    if logits == "all":
        return 0
    if logits == "last":
        return 1
    m = re.fullmatch(r"last:(\d+)", logits or "")
    if m and 2 <= int(m.group(1)) <= MAX_LOGITS_KEEP:
        return int(m.group(1))
    raise ArtifactError(f"logits {logits!r} is not one of all, last, last:N (2 <= N <= {MAX_LOGITS_KEEP})")
# KV cache layout of every past_key_values.{i}.* input and present.{i}.* output
KV_LAYOUT = ("batch", "n_head", "past_sequence", "head_dim")
# how a graph updates its KV cache: "concat" -> present = Concat(past, new), rows left-padded through the mask
# (standard ONNX; TensorRT and other runtimes run it); "shared" -> onnxruntime's GroupQueryAttention writes the
# new positions in place into one fixed-capacity buffer bound as both past and present, rows left-aligned
# (export/kv_shared.py). Artifacts older than the field: "concat".
KV_CACHES = ("concat", "shared")


class ArtifactError(ValueError):
    """An artifact that is not ours, is damaged, or does not match what the runtime expects."""


ONNX_NAME = "model.onnx"
ENGINE_NAME = "model.engine"


def data_path(onnx_path: str | Path) -> Path:
    """The external data file beside a graph: its full name + ".data" (model.onnx.data)."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name + ".data")


def sidecar_path(engine: str | Path) -> Path:
    """The sidecar of an engine file: its full name + ".json" (model.engine.json, x.plan.json). The only place
    the name is made: the builder writes there, the backend and the benchmark read there."""
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def input_names(n_layer: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def output_names(n_layer: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


@dataclass(frozen=True)
class Record:
    """A frozen dataclass that describes an artifact file and round-trips through a dict / JSON file under a format
    tag (FORMAT, its version). Nested values serialise through their own to_dict (a GPTConfig, an Artifact)."""
    FORMAT: ClassVar[str] = ""
    KIND: ClassVar[str] = "artifact metadata"  # what a read error calls the file
    READ_HINT: ClassVar[str] = ""  # appended to a read error: how to make a good one

    def to_dict(self) -> dict:
        d = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        d["format"] = self.FORMAT
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str):
        raise NotImplementedError

    @classmethod
    def _check_format(cls, d: dict, what: str, fix: str) -> None:
        if d.get("format") != cls.FORMAT:
            raise ArtifactError(f"{what} (format {d.get('format')!r}, expected {cls.FORMAT!r}); {fix}")

    @classmethod
    def _plain_fields(cls, d: dict, *nested: str) -> dict:
        """The fields of `d` that are this class's own, less the `nested` ones the subclass builds itself."""
        return {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name not in nested and f.name in d}

    def write_json(self, path: str | Path) -> None:
        from .files import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def read_json(cls, path: str | Path):
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ArtifactError(f"cannot read {cls.KIND} {path}: {e}{cls.READ_HINT}") from None
        return cls.from_dict(d, str(path))


def _plain(value):
    return value.to_dict() if hasattr(value, "to_dict") else copy.deepcopy(value)


@dataclass(frozen=True)
class Artifact(Record):
    FORMAT: ClassVar[str] = FORMAT
    config: GPTConfig
    precision: str = "fp32"
    tokenizer: str = "gpt2"
    logits: str = "all"  # LOGITS: the runtime's contract on the logits output's sequence axis
    kv_cache: str = "concat"  # KV_CACHES
    source: str = ""
    source_sha256: str = ""
    # {external data file beside model.onnx: sha256} recorded at export ({} when the weights are all inside
    # model.onnx); None in artifacts older than the field, whose weights cannot be proven (check_weights)
    data_sha256: dict | None = None
    versions: dict = field(default_factory=dict)  # exporter versions: torch, onnx, onnxruntime, this project
    extra: dict = field(default_factory=dict)  # e.g. parity numbers measured at export

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ArtifactError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        logits_keep(self.logits)  # raises for an unknown mode
        if self.kv_cache not in KV_CACHES:
            raise ArtifactError(f"kv_cache {self.kv_cache!r} is not one of {KV_CACHES}")

    @property
    def inputs(self) -> list[str]:
        return input_names(self.config.n_layer)

    @property
    def outputs(self) -> list[str]:
        return output_names(self.config.n_layer)

    @property
    def kv_dtype(self) -> str:
        """numpy dtype name of the KV cache (and of logits): fp16 graphs keep fp16 activations."""
        return "float16" if self.precision == "fp16" else "float32"

    def logits_positions(self, seq: int) -> int:
        """How many positions the logits of a `seq`-token step hold: seq, 1 for "last", min(seq, N) for "last:N"."""
        keep = logits_keep(self.logits)
        return min(seq, keep) if keep else seq

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["inputs"], d["outputs"], d["kv_layout"] = self.inputs, self.outputs, list(KV_LAYOUT)
        return d

    def to_metadata(self) -> dict[str, str]:
        """ONNX metadata_props: flat string -> string."""
        return {PREFIX + k: v if isinstance(v, str) else json.dumps(v, sort_keys=True)
                for k, v in self.to_dict().items()}

    @classmethod
    def from_dict(cls, d: dict, where: str = "artifact") -> Artifact:
        cls._check_format(d, f"{where} was not exported by nanogpt-deploy",
                          "export it with `nanogpt-deploy export SOURCE --out DIR`")
        try:
            art = cls(config=GPTConfig.from_dict(d["config"]), **cls._plain_fields(d, "config"))
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{where}: damaged nanogpt-deploy metadata: {e}") from None
        if d.get("inputs", art.inputs) != art.inputs or d.get("outputs", art.outputs) != art.outputs:
            raise ArtifactError(f"{where}: metadata I/O names do not match its config ({art.config.n_layer} layers)")
        return art

    @classmethod
    def from_metadata(cls, props: dict[str, str], where: str = "model.onnx") -> Artifact:
        d = {}
        for k, v in props.items():
            if not k.startswith(PREFIX):
                continue
            k = k[len(PREFIX):]
            try:
                d[k] = v if k in ("format", "precision", "tokenizer", "logits", "kv_cache", "source", "source_sha256") else json.loads(v)
            except json.JSONDecodeError:
                raise ArtifactError(f"{where}: metadata field {k!r} is not valid JSON") from None
        if not d:
            raise ArtifactError(f"{where} has no nanogpt-deploy metadata; export it with "
                                f"`nanogpt-deploy export SOURCE --out DIR` (graphs from other exporters are not supported)")
        return cls.from_dict(d, where)


def data_digests(path: str | Path) -> dict[str, str]:
    """{file name: sha256} of every external data file the graph `path` references (`{}` when its weights are all
    inside it): recorded at export (Artifact.data_sha256), so check_weights can prove the weights beside it are the
    exported ones. Needs onnx (the exporter's dependency)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    from .files import sha256_file

    path = Path(path)
    m = onnx.load(str(path), load_external_data=False)
    names = sorted({ExternalDataInfo(t).location for t in m.graph.initializer if uses_external_data(t)})
    return {name: sha256_file(path.parent / name) for name in names}


def check_weights(onnx_path: str | Path, artifact: Artifact) -> str:
    """Prove the external data files beside `onnx_path` are the ones exported with it (their sha256 is recorded in
    model.onnx); raise ArtifactError naming the file and the fix otherwise. Returns a note for an artifact that
    records no digest (exported before the field: it loads, unverified), else "".

    Hashing costs about a second per 500 MB (docs/export.md); callers skip it with verify_weights=False.
    """
    onnx_path = Path(onnx_path)
    if artifact.data_sha256 is None:
        return (f"{onnx_path} records no digest of its weights (exported before nanogpt-deploy recorded one), so "
                f"they are not verified; re-export it to add one")
    from .files import sha256_file

    for name, want in sorted(artifact.data_sha256.items()):
        data = onnx_path.parent / name
        if Path(name).name != name:
            raise ArtifactError(f"{onnx_path}: damaged metadata: data file {name!r} is not a plain file name; re-export it")
        if not data.is_file():
            raise ArtifactError(f"{onnx_path} keeps its weights in {name}, which is missing ({data}); copy the whole "
                                f"exported folder (model.onnx and {name} travel together)")
        got = sha256_file(data)
        if got != want:
            raise ArtifactError(
                f"{data} ({data.stat().st_size} bytes) is not the weights file exported with {onnx_path.name}: sha256 "
                f"{got[:16]}..., recorded at export {want[:16]}... (a partial or damaged copy, or another export's "
                f"weights); re-copy the whole exported folder or re-export it (--no-verify-weights skips this check)")
    return ""


def check_io(expected: list[str], actual: list[str], what: str, where: str) -> None:
    """Raise listing both differences when a graph's/engine's I/O names are not the expected ones."""
    missing = [n for n in expected if n not in actual]
    extra = [n for n in actual if n not in expected]
    if missing or extra:
        raise ArtifactError(f"{where}: {what} names differ from the artifact's layout; "
                            f"missing {missing or 'none'}, unexpected {extra or 'none'}")


def resolve_file(path: str | Path, name: str, how_to_make: str) -> Path:
    """`DIR` or `DIR/<name>` -> that file's path, with a clear error (saying how to make one) when it is not there."""
    p = Path(path).expanduser()
    if not p.exists():  # an export swapped in by two renames and killed between them: put the old folder back
        from .files import recover_folder

        recover_folder(p.parent if p.name == name else p)
    if p.is_dir():
        p = p / name
    if not p.is_file():
        raise ArtifactError(f"{p} does not exist; give the file or the folder holding {name} ({how_to_make})")
    return p


def resolve_onnx(path: str | Path) -> Path:
    """`DIR` or `DIR/model.onnx` -> the model.onnx path."""
    return resolve_file(path, ONNX_NAME, "create one with `nanogpt-deploy export SOURCE --out DIR`")


def resolve_engine(path: str | Path) -> Path:
    """`DIR` or `DIR/model.engine` -> the engine path, with a clear error when it is not there."""
    return resolve_file(path, ENGINE_NAME, "build one with `nanogpt-deploy build-engine MODEL_DIR --out ENGINE`")


def read_onnx_artifact(path: str | Path) -> Artifact:
    """The Artifact of a model.onnx, from its metadata_props alone: no onnx package, no session, no weights read
    (`onnx_metadata`), so a deploy box learns what a model is before opening it, in milliseconds."""
    p = resolve_onnx(path)
    return Artifact.from_metadata(onnx_metadata(p), str(p))


# ModelProto's field numbers (onnx.proto: stable since IR version 1): metadata_props is `repeated
# StringStringEntryProto metadata_props = 14`, each entry `string key = 1; string value = 2`
_METADATA_PROPS, _KEY, _VALUE = 14, 1, 2


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """A model.onnx's metadata_props as a dict, read from the protobuf wire format: the top-level fields are walked
    by their tags and lengths, and everything but metadata_props (the graph, inline weights included) is skipped
    with a seek, unread. A file that is not a ModelProto is an ArtifactError naming it."""
    p = Path(path)
    props: dict[str, str] = {}
    try:
        with open(p, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            while f.tell() < size:
                field_no, wire = divmod(_varint(f), 8)
                if wire == 0:
                    _varint(f)
                elif wire in (1, 5):
                    f.seek(8 if wire == 1 else 4, 1)
                elif wire == 2:
                    n = _varint(f)
                    if f.tell() + n > size:
                        raise ValueError("a field runs past the end of the file")
                    if field_no == _METADATA_PROPS:
                        key, value = _entry(f.read(n))
                        props[key] = value
                    else:
                        f.seek(n, 1)
                else:
                    raise ValueError(f"wire type {wire} is not a ModelProto's")
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{p} is not a readable ONNX file ({e}); export it again with "
                            f"`nanogpt-deploy export SOURCE --out DIR`") from None
    return props


def _varint(f) -> int:
    value = shift = 0
    while True:
        b = f.read(1)
        if not b:
            raise ValueError("the file ends inside a field")
        value |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 10 bytes")


def _entry(buf: bytes) -> tuple[str, str]:
    """A StringStringEntryProto's (key, value)."""
    f, out = io.BytesIO(buf), {_KEY: b"", _VALUE: b""}
    while f.tell() < len(buf):
        field_no, wire = divmod(_varint(f), 8)
        if wire != 2:
            raise ValueError("a metadata entry that is not two strings")
        n = _varint(f)
        out[field_no] = f.read(n)
    return out[_KEY].decode(), out[_VALUE].decode()
