"""Shared fixtures: a tiny random GPT (seconds to build/export/run) and its ONNX export, made once."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_model():
    from model import GPT

    return GPT.from_pretrained("random:tiny@0")


@pytest.fixture(scope="session")
def tiny_onnx_dir(tmp_path_factory, tiny_model):
    """DIR holding model.onnx of the tiny model (fp32), exported once per test session."""
    from export.onnx import export_onnx

    out = tmp_path_factory.mktemp("tiny_onnx")
    export_onnx(tiny_model, out)
    return out


@pytest.fixture(scope="session")
def tokenizer():
    """tiktoken gpt2 from the local ranks (scripts/setup.sh fetches them); a missing file fails loudly."""
    from runtime.tokenizer import load_tokenizer

    return load_tokenizer()


def max_abs_diff(a, b) -> float:
    import numpy as np

    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def onnx_with_a_nan_weight(src, dst_dir, initializer: str = "model.lm_head.weight", index=(0, 0)):
    """A copy of the export `src` (model.onnx) whose `initializer` holds one NaN at `index`. The default, the
    tied lm_head's [0, 0], makes logits[..., 0] NaN at every position; model.transformer.wpe.weight [p, 0]
    poisons position p only. Returns the copy's model.onnx."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from export.graph import save_model

    m = onnx.load(str(src))
    t = next(t for t in m.graph.initializer if t.name == initializer)
    w = numpy_helper.to_array(t).copy()
    w[index] = np.nan
    t.CopyFrom(numpy_helper.from_array(w, initializer))
    dst = Path(dst_dir) / "model.onnx"
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_model(m, dst)
    return dst
