"""Chat messages -> prompt text, with a Jinja chat template as Hugging Face tokenizers define it.

The template is the server's `--chat-template` (a file, or the name of one shipped in
ecserve/chat_templates/), else the model directory's `chat_template.jinja` or the
`chat_template` of its `tokenizer_config.json`. A model with none of them (a base model, such
as the shipped default) has no chat endpoint: /v1/chat/completions answers 400 naming
`--chat-template`, as vLLM does.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from ecserve.errors import ConfigError

SHIPPED = Path(__file__).resolve().parent.parent / "chat_templates"


class ChatTemplateError(ValueError):
    """The template refused the messages (its raise_exception), or failed rendering them."""


class ChatTemplate:
    """A compiled template; `render` is called per request on the event loop."""

    def __init__(self, source: str, origin: str, bos_token: str = "", eos_token: str = ""
                 ) -> None:
        # Sandboxed and immutable, as transformers renders them: a template comes with a
        # downloaded model and must not reach the server's objects.
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda v, indent=None: json.dumps(v, indent=indent,
                                                                  ensure_ascii=False)
        try:
            self._template = env.from_string(source)
        except TemplateError as e:
            raise ConfigError(f"chat template {origin}: {e}", field="chat_template") from None
        self._error = TemplateError
        self.origin, self.bos_token, self.eos_token = origin, bos_token, eos_token

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               continue_final_message: bool = False, **kwargs: Any) -> str:
        """The prompt text. The model's BOS token is left out: the server's encode adds it."""
        try:
            text = self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt
                and not continue_final_message, bos_token=self.bos_token,
                eos_token=self.eos_token, **kwargs)
        except ChatTemplateError:
            raise
        except self._error as e:
            raise ChatTemplateError(f"the chat template failed on these messages: {e}") from None
        if continue_final_message:  # the reply goes on from the last message's text
            last = messages[-1].get("content") or ""
            if last and last in text:
                text = text[:text.rindex(last) + len(last)]
        if self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token):]
        return text


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def read_option(option: str) -> tuple[str, str]:
    """`--chat-template`'s (source, where it came from): a shipped template's name or a file.
    Read when the server starts, before the model loads, so a wrong path fails at once."""
    shipped = SHIPPED / f"{option}.jinja"
    path = shipped if "/" not in option and shipped.is_file() else Path(option)
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except OSError as e:
        names = ", ".join(sorted(p.stem for p in SHIPPED.glob("*.jinja")))
        raise ConfigError(f"chat template {option}: {e.strerror} (give a Jinja file, or one "
                          f"of the shipped templates: {names})", field="chat_template") from None


def load_chat_template(option: tuple[str, str] | None, model_dir: Path, bos_token: str = "",
                       eos_token: str = "") -> ChatTemplate | None:
    """The server's template: the option's (read_option), else the model directory's, else
    None."""
    if option is not None:
        return ChatTemplate(*option, bos_token, eos_token)
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return ChatTemplate(jinja.read_text(encoding="utf-8"), str(jinja), bos_token, eos_token)
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        try:
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, AttributeError):
            template = None
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template
                             if isinstance(t, dict) and t.get("name") == "default"), None)
        if isinstance(template, str):
            return ChatTemplate(template, str(config), bos_token, eos_token)
    return None
