"""GPTConfig: the shape of a GPT-2 / nanoGPT decoder, as a dataclass with a JSON round-trip.

Pure Python on purpose: the runtime reads configs from ONNX metadata on machines without torch.

    from model.config import GPTConfig
    cfg = GPTConfig.preset("gpt2"); GPTConfig.from_json(cfg.to_json()) == cfg
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

GPT2_VOCAB_SIZE = 50257  # tiktoken gpt2: 50256 BPE ranks + <|endoftext|>
GPT2_EOT_TOKEN = 50256


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024  # max positions (learned wpe rows)
    vocab_size: int = GPT2_VOCAB_SIZE  # rows of wte / lm_head (nanoGPT pads to 50304)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # bias in Linear and LayerNorm, as GPT-2
    gelu: str = "tanh"  # "tanh" (GPT-2's released weights) or "exact" (nanoGPT's nn.GELU())
    layer_norm_eps: float = 1e-5
    # ids >= real_vocab_size are padding rows (nanoGPT's 50304) and must never be sampled
    real_vocab_size: int | None = None
    tokenizer: str = "gpt2"

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.gelu not in ("tanh", "exact"):
            raise ValueError(f"gelu must be 'tanh' or 'exact', got {self.gelu!r}")
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.real_vocab_size is None:
            object.__setattr__(self, "real_vocab_size", self.vocab_size)
        if not 0 < self.real_vocab_size <= self.vocab_size:
            raise ValueError(f"real_vocab_size ({self.real_vocab_size}) must be in 1..vocab_size ({self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {unknown}; known: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> GPTConfig:
        return cls.from_dict(json.loads(s))

    @classmethod
    def preset(cls, name: str, **overrides) -> GPTConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # the test model: seconds to build, export and run
    "tiny": GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=512, block_size=128, gelu="exact"),
}
