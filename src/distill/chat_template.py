"""The chat template every stage uses for a tokenizer that has none (a base LM).

One home, so training, evaluation, the local teacher, export measurement and `distill chat`
render a conversation identically. The template is saved with the trained student's tokenizer,
so the artifacts carry it too.
"""

from __future__ import annotations

from typing import Any

# Plain role tags, the assistant turn closed by EOS so the student learns to stop. The tags are
# ordinary text to a base tokenizer (no new tokens, no resized embeddings).
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def ensure_chat_template(tok: Any) -> bool:
    """Give `tok` the default template when it has none; True when it was added."""
    if getattr(tok, "chat_template", None):
        return False
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return True


def render_chat(tok: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text for `messages`, ending where the assistant's answer starts."""
    ensure_chat_template(tok)
    return str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
