"""An Ollama `Modelfile` beside model.gguf: `ollama create student -f Modelfile` runs the GGUF
with the student's own chat template and stop tokens.

Ollama does not run Jinja: its TEMPLATE is a Go `text/template` over `.Messages` (each with
`.Role` and `.Content`). The student's Jinja template is not parsed; it is *rendered* on probe
conversations and read back as text around each turn (`TurnFormat`): what comes once before the
first message, before and after each role's content, a default system turn the template inserts
when the conversation has none (SmolLM2, Qwen2.5), and the assistant's generation prompt. That
covers ChatML (SmolLM2, Qwen) and the role-tag template distill gives a base LM
(`distill.chat_template`). The reading is then checked: `TurnFormat.render` must reproduce the
Jinja output on every check conversation (system or not, multi-turn, content with newlines and
spaces) or no TEMPLATE is written — a template that trims, merges the system prompt into the
first user turn (Gemma) or dates its system prompt is not translated, and the Modelfile says why
(Ollama then falls back to its own guess from the GGUF's `tokenizer.chat_template`).

The TEMPLATE emitted from a TurnFormat uses only `range $i, $m := .Messages`, `if`/`else if`
with `and`/`eq`/`ne`, `{{ $m.Content }}` and literal text (no `{{-` trims, so the literal text is
exact); `tool` turns are not rendered.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODELFILE = "Modelfile"
ROLES = ("system", "user", "assistant")

Render = Callable[[list[dict[str, str]], bool], str]
"""(messages, add_generation_prompt) → prompt text: the student's Jinja chat template."""

# Probe contents: plain words a template passes through untouched, distinct from any tag.
_S, _U, _A, _U2 = "Zqx7sysprobe", "Zqx7userprobe", "Zqx7asstprobe", "Zqx7userprobe2"
# Conversations the derived turns must reproduce exactly (with the generation prompt).
CHECKS: tuple[list[dict[str, str]], ...] = (
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "user", "content": "  Tom has 12 apples.\n\nHow many now? "},
     {"role": "assistant", "content": "12.\nThe answer is 12."},
     {"role": "user", "content": "And pears?\n"}],
    [{"role": "system", "content": "Line one.\nLine two."},
     {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
     {"role": "user", "content": "bye"}],
)


@dataclass(frozen=True)
class TurnFormat:
    """A chat template read as the text around each turn."""

    begin: str
    """Once, before the first message (e.g. a BOS text)."""
    wrap: dict[str, tuple[str, str]]
    """role → (text before its content, text after it)."""
    generation: str
    """After the last message: where the assistant's answer starts."""
    default_system: str | None = None
    """Content of the system turn inserted when the first message is not a system one."""

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt these turns give `messages` (what the Go TEMPLATE renders)."""
        out = self.begin
        for i, m in enumerate(messages):
            if i == 0 and m["role"] != "system" and self.default_system is not None:
                out += self.wrap["system"][0] + self.default_system + self.wrap["system"][1]
            before, after = self.wrap[m["role"]]
            out += before + m["content"] + after
        return out + self.generation

    def go_template(self) -> str:
        """The same turns as an Ollama (Go text/template) TEMPLATE body."""
        sys_before, sys_after = self.wrap["system"]
        out = self.begin + "{{ range $i, $m := .Messages }}"
        if self.default_system is not None:
            out += ('{{ if and (eq $i 0) (ne $m.Role "system") }}'
                    f"{sys_before}{self.default_system}{sys_after}{{{{ end }}}}")
        for n, role in enumerate(ROLES):
            before, after = self.wrap[role]
            out += "{{ if" if n == 0 else "{{ else if"
            out += f' eq $m.Role "{role}" }}}}{before}{{{{ $m.Content }}}}{after}'
        return out + "{{ end }}{{ end }}" + self.generation

    def pieces(self) -> list[str]:
        parts = [self.begin, self.generation, self.default_system or ""]
        return parts + [p for pair in self.wrap.values() for p in pair]


def _split_once(text: str, marker: str) -> tuple[str, str] | None:
    head, sep, tail = text.partition(marker)
    return (head, tail) if sep and marker not in tail else None


def _strip_prefix(text: str, prefix: str) -> str | None:
    return text[len(prefix):] if text.startswith(prefix) else None


def _strip_suffix(text: str, suffix: str) -> str | None:
    return text[:len(text) - len(suffix)] if text.endswith(suffix) else None


def _msgs(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in turns]


def read_turns(render: Render) -> TurnFormat | None:
    """The turns of a chat template, read from its renderings of probe conversations; None when
    the template does not render as text around each turn."""
    try:
        u = render(_msgs(("user", _U)), False)
        ug = render(_msgs(("user", _U)), True)
        ua = render(_msgs(("user", _U), ("assistant", _A)), False)
        uau = render(_msgs(("user", _U), ("assistant", _A), ("user", _U2)), False)
        su = render(_msgs(("system", _S), ("user", _U)), False)
    except Exception:  # noqa: BLE001 - a template that refuses a probe is not translated
        return None
    gen = _strip_prefix(ug, u)
    first, mid_ua, mid_au, sys_split = (_split_once(u, _U), _split_once(ua, _A),
                                        _split_once(uau, _U2), _split_once(su, _S))
    if gen is None or not (first and mid_ua and mid_au and sys_split):
        return None
    head_u, user_after = first
    ua_before, asst_after = mid_ua
    asst_before = _strip_prefix(ua_before, head_u + _U + user_after)
    user_before = _strip_prefix(mid_au[0], ua_before + _A + asst_after)
    if asst_before is None or user_before is None:
        return None
    lead = _strip_suffix(head_u, user_before)  # begin, and any default system turn
    sys_head, sys_rest = sys_split
    sys_mid = _strip_suffix(sys_rest, _U + user_after)
    sys_after = _strip_suffix(sys_mid, user_before) if sys_mid is not None else None
    if lead is None or sys_after is None:
        return None
    begin, sys_before, default = _split_system(lead, sys_head, sys_after, user_before)
    if begin is None:
        return None
    return TurnFormat(begin=begin, generation=gen, default_system=default,
                      wrap={"system": (sys_before, sys_after), "user": (user_before, user_after),
                            "assistant": (asst_before, asst_after)})


def _split_system(lead: str, sys_head: str, sys_after: str, user_before: str
                  ) -> tuple[str | None, str, str | None]:
    """(begin, text before a system turn's content, default system content) from what precedes
    the first user turn (`lead`) and the first system turn (`sys_head` = begin + before)."""
    if sys_head.startswith(lead):
        return lead, sys_head[len(lead):], None  # no default system turn
    inner = _strip_prefix(lead, sys_head)
    default = _strip_suffix(inner, sys_after) if inner is not None else None
    if default is None:
        return None, "", None
    # begin + before-system = sys_head: a system tag spelled like the user tag is the "before".
    sys_tag = user_before.replace("user", "system")
    if user_before != sys_tag and sys_head.endswith(sys_tag):
        return sys_head[:len(sys_head) - len(sys_tag)], sys_tag, default
    return "", sys_head, default


def translate(render: Render) -> tuple[TurnFormat | None, str]:
    """The template's turns when they reproduce it on every check conversation, else None; and
    a one-line reason either way."""
    turns = read_turns(render)
    if turns is None:
        return None, "the chat template does not render as fixed text around each turn"
    for conv in CHECKS:
        if turns.render(conv) != render(conv, True):
            return None, (f"the chat template renders {len(conv)}-message conversations "
                          "differently from fixed text around each turn")
    bad = next((p for p in turns.pieces() if any(s in p for s in ('{{', '"""', "\\"))), None)
    if bad is not None or turns.generation.endswith('"'):
        return None, "the template's text holds characters a Modelfile TEMPLATE cannot quote"
    return turns, "ChatML-like turns" if "<|im_start|>" in turns.wrap["user"][0] \
        else "fixed text around each turn"


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def modelfile_text(gguf_name: str, turns: TurnFormat | None, why: str, stops: list[str]
                   ) -> str:
    """The Modelfile: FROM, TEMPLATE (when translated, else a comment saying why not), the stop
    tokens, greedy decoding as export.json measured it."""
    lines = ["# Ollama: ollama create NAME -f Modelfile (written by distill export)",
             f"FROM ./{gguf_name}"]
    if turns is not None:
        default = " with its default system prompt" if turns.default_system else ""
        lines += [f"# TEMPLATE: the student's chat template ({why}){default}",
                  f'TEMPLATE """{turns.go_template()}"""']
    else:
        lines.append(f"# no TEMPLATE: {why}; Ollama guesses one from the GGUF's "
                     "tokenizer.chat_template")
    lines += [f"PARAMETER stop {_quote(s)}" for s in stops]
    lines += ["# greedy decoding, as the export measured accuracy", "PARAMETER temperature 0"]
    return "\n".join(lines) + "\n"


def stop_tokens(tok: Any, model_dir: Path) -> list[str]:
    """The end-of-turn token texts: the tokenizer's EOS and generation_config.json's eos ids
    (the padding token the runners also stop on is not a turn's end)."""
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(e for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
    texts = {str(tok.convert_ids_to_tokens(int(i))) for i in ids}
    return sorted(t for t in texts if t and t != "None")


def jinja_render(tok: Any) -> Render:
    """The tokenizer's own chat template as a `Render` (distill's default when it has none)."""
    from distill.chat_template import ensure_chat_template

    ensure_chat_template(tok)

    def render(messages: list[dict[str, str]], generation: bool) -> str:
        return str(tok.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=generation))
    return render


def write_modelfile(model_dir: Path, gguf_name: str) -> str:
    """`model_dir/Modelfile` for the GGUF beside it (tokenizer and configs in `model_dir`);
    returns the export.json note."""
    from distill.export.runtime import load_tokenizer_dir

    tok = load_tokenizer_dir(model_dir)
    turns, why = translate(jinja_render(tok))
    stops = stop_tokens(tok, model_dir)
    (model_dir / MODELFILE).write_text(modelfile_text(gguf_name, turns, why, stops))
    what = f"TEMPLATE from the chat template ({why})" if turns else f"no TEMPLATE ({why})"
    return f"Ollama {MODELFILE}: {what}, stop {', '.join(stops) or 'none'}"
