"""Chat messages -> one prompt string, through a Jinja2 chat template (as transformers and vLLM render them).

A template sees `messages` (a list of {role, content}), `add_generation_prompt` (True), `bos_token` and
`eos_token` (both `<|endoftext|>` for GPT-2's tokenizer) and `raise_exception(message)`, in Jinja2's sandbox.
Generation stops at `<|endoftext|>` (the stop token id every request has) and at the template's stop strings.

The default, for base models such as GPT-2 that were never tuned on a chat format, is a plain transcript:

    system: You are terse.
    user: Hello
    assistant:

one `role: content` line per message, then `assistant:` for the model to continue; it stops where the model
starts another turn (`\\nuser:`, `\\nsystem:`, `\\nassistant:`). A base model's reply usually begins with a space.

    template = ChatTemplate.from_file("chatml.jinja", stop=("<|im_end|>",))   # nanogpt-deploy serve --chat-template
    prompt = template.render([{"role": "user", "content": "Hello"}])
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"
DEFAULT_TEMPLATE = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                    "{% if add_generation_prompt %}assistant:{% endif %}")
DEFAULT_STOP = ("\nuser:", "\nsystem:", "\nassistant:")
ROLES = ("system", "developer", "user", "assistant", "tool")


class ChatTemplate:
    """A compiled chat template and the strings that end a reply (module docstring)."""

    def __init__(self, source: str = DEFAULT_TEMPLATE, stop: Sequence[str] | None = None, name: str = "default"):
        try:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as e:
            raise RuntimeError(f"chat templates need {e.name}, which is not installed; "
                               f"pip install 'nanogpt-deploy[serve]'") from None
        self.name, self._error = name, TemplateError
        self.stop = tuple(DEFAULT_STOP if stop is None and source == DEFAULT_TEMPLATE else stop or ())
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
        env.globals["raise_exception"] = _raise
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise ValueError(f"chat template {name}: {e} (line {getattr(e, 'lineno', '?')}); fix the template") from None

    @classmethod
    def from_file(cls, path: str | Path, stop: Sequence[str] = ()) -> ChatTemplate:
        """A template from a Jinja2 file; `stop`: strings that end a reply besides `<|endoftext|>`."""
        return cls(Path(path).read_text(encoding="utf-8"), stop, name=str(path))

    def render(self, messages: list[dict]) -> str:
        """The prompt for `messages`; ValueError (a 400 at the server) naming what is wrong with them."""
        clean = []
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]: the text parts, joined
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise ValueError(f"messages[{i}].content parts must be {{type: text, text}}; this model reads text "
                                     f"only")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise ValueError(f"messages[{i}].content must be a string or a list of text parts, got "
                                 f"{type(content).__name__}")
            clean.append({"role": role, "content": content})
        try:
            return self.template.render(messages=clean, add_generation_prompt=True, bos_token=EOS_TOKEN,
                                        eos_token=EOS_TOKEN)
        except self._error as e:
            raise ValueError(f"chat template {self.name} could not render these messages: {e}") from None




def _raise(message: str):
    from jinja2 import TemplateError

    raise TemplateError(message)
