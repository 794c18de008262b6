"""Chat messages → prompt text: the tokenizer's own chat template when the model folder has one
(``tokenizer_config.json``'s ``chat_template``, Jinja, rendered in a sandbox as transformers renders it), else
the default below.

The default template (for models trained on plain text, such as ``blackmamba train``'s) writes each message as
``"{Role}: {content}\\n\\n"`` (``System``, ``User``, ``Assistant``) and ends with ``"Assistant:"``, where the
model continues; the reply ends at EOS, at ``max_tokens``, at the request's stop strings, or where the model
starts the next user turn (``DEFAULT_STOP``).
"""

from __future__ import annotations

import json
from pathlib import Path

ROLES = ("system", "developer", "user", "assistant")
DEFAULT_STOP = ("\n\nUser:",)


class ChatTemplate:
    def __init__(self, source: str | None = None, bos: str = "", eos: str = ""):
        self.source = source
        self.bos, self.eos = bos, eos
        self._template = None
        if source is not None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            self._template = env.from_string(source)

    @property
    def stop(self) -> tuple[str, ...]:
        """Stop strings the template implies (the default's next user turn)."""
        return () if self._template is not None else DEFAULT_STOP

    @classmethod
    def for_folder(cls, folder) -> "ChatTemplate":
        """The template of ``folder/tokenizer_config.json`` if it has one, else the default."""
        path = Path(folder) / "tokenizer_config.json" if folder is not None else None
        if path is not None and path.is_file():
            try:
                config = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ValueError(f"{path}: not readable JSON ({e})") from None
            source = config.get("chat_template")
            if isinstance(source, list):  # named templates: the default one
                source = next((t.get("template") for t in source if t.get("name") == "default"), None)
            if isinstance(source, str):
                def token(v):
                    return v.get("content", "") if isinstance(v, dict) else (v or "")
                return cls(source, token(config.get("bos_token")), token(config.get("eos_token")))
        return cls()

    def render(self, messages: list[dict]) -> str:
        """The prompt for ``messages`` ([{"role", "content"}], content already text), ready for the reply."""
        if self._template is not None:
            try:
                return self._template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos,
                                             eos_token=self.eos)
            except ValueError:  # raise_exception's message, as it is
                raise
            except Exception as e:  # noqa: BLE001  (jinja's errors, and the template's own: 'a' + 1, ...)
                raise ValueError(f"the model's chat template failed on these messages: {e}") from None
        return "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"


def _raise(message):
    raise ValueError(f"the chat template refused the messages: {message}")
