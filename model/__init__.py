"""The GPT-2 / nanoGPT decoder (torch) and its config (pure Python).

`from model import GPT, GPTConfig` imports torch; `from model.config import GPTConfig` does not.
"""
from .config import PRESETS, GPTConfig


def __getattr__(name):  # GPT is imported lazily so `import model.config` stays torch-free
    if name == "GPT":
        from .gpt import GPT

        return GPT
    raise AttributeError(f"module 'model' has no attribute {name!r}")


__all__ = ["GPT", "GPTConfig", "PRESETS"]
