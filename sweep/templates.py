"""Chat templates: the model's own role tokens around the task's system prompt.

FastChat's conversation templates are the source, as in the 2023 leaderboard. Where
FastChat does not know a model it silently falls back to its canned `one_shot` template
(e.g. Llama-3, Gemma); for those we use the tokenizer's own `chat_template` instead.
Each result row records which template was used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FASTCHAT_FALLBACK = "one_shot"


@dataclass(frozen=True)
class ChatTemplate:
    """How to wrap one user prompt, and when generation should stop."""

    name: str  # e.g. "fastchat:vicuna_v1.1" or "tokenizer"
    stop_strings: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    add_special_tokens: bool  # False when the rendered text already holds BOS
    _conv: Any = None  # FastChat Conversation, or None for the tokenizer's template
    _tokenizer: Any = None

    def render(self, system_prompt: str, user_text: str) -> str:
        if self._conv is not None:
            conv = self._conv.copy()
            conv.set_system_message(system_prompt)
            conv.append_message(conv.roles[0], user_text)
            conv.append_message(conv.roles[1], None)
            return conv.get_prompt()
        messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": user_text}]
        try:
            return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:
            # Some templates (Gemma) refuse a system role: put it ahead of the user turn.
            merged = [{"role": "user", "content": f"{system_prompt}\n\n{user_text}"}]
            return self._tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)


def _eos_ids(tokenizer: Any, generation_config: Any = None) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return ids


def fastchat_template_name(model_path: str, conv_template: str | None) -> str:
    if conv_template:
        return conv_template
    # Imports model code (and psutil/accelerate): only needed without an explicit name.
    from fastchat.model.model_adapter import get_conversation_template

    return get_conversation_template(model_path).name


def resolve(model_path: str, conv_template: str | None, tokenizer: Any, generation_config: Any = None) -> ChatTemplate:
    from fastchat.conversation import get_conv_template

    name = fastchat_template_name(model_path, conv_template)
    eos = _eos_ids(tokenizer, generation_config)
    if name == FASTCHAT_FALLBACK and not conv_template and getattr(tokenizer, "chat_template", None):
        return ChatTemplate("tokenizer", (), tuple(sorted(eos)), False, None, tokenizer)
    conv = get_conv_template(name)
    stops = conv.stop_str if isinstance(conv.stop_str, (list, tuple)) else [conv.stop_str] if conv.stop_str else []
    ids = eos | set(conv.stop_token_ids or ())
    return ChatTemplate(f"fastchat:{name}", tuple(stops), tuple(sorted(ids)), True, conv, None)
