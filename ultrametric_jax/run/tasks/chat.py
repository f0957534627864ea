"""Chat prompts: the model's own chat template when one is known, else ChatML as SmolLM2
writes it.

Where a template comes from, in order: the `chat_template` argument (a Jinja string, such as
the `tokenizer.chat_template` field of a GGUF file: `chat_template_from_gguf`), the tokenizer
itself when it is a transformers tokenizer with a template, and the ChatML fallback.
"""
from __future__ import annotations

from typing import Optional

import jinja2
import jinja2.sandbox

from ultrametric_jax.io.gguf import field_value, open_gguf

# SmolLM2-Instruct's template inserts this system turn when the conversation has none.
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
GGUF_TEMPLATE_FIELD = "tokenizer.chat_template"


def chatml(messages: list[dict], system: str = DEFAULT_SYSTEM) -> str:
    """ChatML with SmolLM2's default system turn, ending with the assistant's turn opened."""
    if messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def render_template(template: str, messages: list[dict]) -> str:
    """A Jinja chat template rendered the way transformers renders one (sandboxed,
    trim_blocks, lstrip_blocks), with the assistant's turn opened."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                            bos_token="", eos_token="")


def chat_prompt(tokenizer, user_text: str, template: Optional[str] = None) -> str:
    """The text of a one-turn conversation, ready for the assistant's reply."""
    messages = [{"role": "user", "content": user_text}]
    if template:
        return render_template(template, messages)
    if getattr(tokenizer, "chat_template", None) and hasattr(tokenizer, "apply_chat_template"):
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
    return chatml(messages)


def chat_template_from_gguf(path: str) -> Optional[str]:
    """The chat template stored in a GGUF file's metadata, or None."""
    return field_value(open_gguf(path), GGUF_TEMPLATE_FIELD)
