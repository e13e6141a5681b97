"""GGUF the way edge users run it (#26 part 3): llama.cpp's quantizer types (Q6_K, Q5_K_M,
Q4_K_M, Q4_0 besides f32/f16/Q8_0), the chat template and stop tokens inside the file, an Ollama
Modelfile whose Go TEMPLATE renders the student's Jinja chat template, and answers through
llama.cpp's own chat API.

The Modelfile's TEMPLATE is checked by `render_go`, a small interpreter of the Go
`text/template` subset the Modelfile writer emits (and a little more: trim markers, `range` over
dot, `or`/`not`/`len`/`index`); it refuses anything else, so a TEMPLATE outside the subset fails
loudly instead of rendering as something Ollama would not.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from distill.config import ConfigError, ExportConfig, load_config
from distill.export.files import GGUF_FILE, weight_bytes
from distill.export.modelfile import MODELFILE, jinja_render, translate
from distill.export.runtime import Runner
from tests.test_export import _project
from tests.tiny import make_tiny_lm, make_tokenizer

# --- a Go text/template interpreter for the Modelfile's subset -----------------------------

_ACTION = re.compile(r"\{\{(- )?(.*?)( -)?\}\}", re.S)
_WORD = re.compile(r'\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+')


def _parse(src: str) -> list[Any]:
    """Template source → nodes: str (text), ("out", expr), ("if", [(cond, body)], else_body),
    ("range", (key_var, value_var), expr, body)."""
    items: list[Any] = []
    pos = 0
    for m in _ACTION.finditer(src):
        text = src[pos:m.start()]
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        items.append(text)
        items.append(("action", m.group(2).strip(), bool(m.group(3))))
        pos = m.end()
    items.append(src[pos:])
    # a `-}}` trims the whitespace of the text after it
    for i, it in enumerate(items):
        if isinstance(it, tuple) and it[2] and i + 1 < len(items):
            items[i + 1] = items[i + 1].lstrip(" \t\r\n")
    body, rest = _block(iter(items), top=True)
    assert rest is None
    return body


def _block(items: Any, top: bool = False) -> tuple[list[Any], str | None]:
    """Nodes up to the `end`/`else...` that closes this block (returned as the second item)."""
    out: list[Any] = []
    for it in items:
        if isinstance(it, str):
            if it:
                out.append(it)
            continue
        words = it[1]
        if words == "end" or words.startswith("else"):
            if top:
                raise ValueError(f"unexpected {{{{ {words} }}}}")
            return out, words
        if words.startswith("if "):
            out.append(_if(words[3:], items))
        elif words.startswith("range "):
            out.append(_range(words[6:], items))
        else:
            out.append(("out", words))
    if not top:
        raise ValueError("unclosed block")
    return out, None


def _if(cond: str, items: Any) -> tuple[Any, ...]:
    branches, otherwise = [], []
    while True:
        body, closer = _block(items)
        branches.append((cond, body))
        assert closer is not None
        if closer == "end":
            break
        if closer.startswith("else if "):
            cond = closer[8:]
            continue
        if closer != "else":
            raise ValueError(f"unsupported {{{{ {closer} }}}}")
        otherwise, closer = _block(items)
        if closer != "end":
            raise ValueError("else must be closed by end")
        break
    return ("if", branches, otherwise)


def _range(spec: str, items: Any) -> tuple[Any, ...]:
    m = re.fullmatch(r"(?:(\$\w+)\s*,\s*(\$\w+)\s*:=\s*)?(.+)", spec.strip())
    assert m, spec
    body, closer = _block(items)
    if closer != "end":
        raise ValueError("range with else is not in the subset")
    return ("range", (m.group(1), m.group(2)), m.group(3), body)


def _truthy(v: Any) -> bool:
    return bool(v)  # Go: false, 0, "", nil and empty collections are false


def _field(v: Any, name: str) -> Any:
    if not isinstance(v, dict) or name not in v:
        raise KeyError(f"no field {name} in {v!r}")  # Go fails on a missing struct field
    return v[name]


def _value(word: str, dot: Any, scope: dict[str, Any]) -> Any:
    if word.startswith('"'):
        return json.loads(word)
    if re.fullmatch(r"-?\d+", word):
        return int(word)
    if word in ("true", "false"):
        return word == "true"
    head, *fields = word.split(".")
    if head.startswith("$"):
        v = scope[head]
    elif head == "":
        v = dot
    else:
        raise ValueError(f"unsupported word {word!r}")
    for f in fields:
        if f:
            v = _field(v, f)
    return v


FUNCS = {"eq": lambda a, *bs: any(a == b for b in bs), "ne": lambda a, b: a != b,
         "not": lambda a: not _truthy(a), "len": len, "index": lambda a, i: a[i]}


def _eval(words: list[str], dot: Any, scope: dict[str, Any]) -> Any:
    args: list[Any] = []
    i = 0
    while i < len(words):
        w = words[i]
        if w == "(":
            depth, j = 1, i + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(words[j], 0)
                j += 1
            args.append(("expr", words[i + 1:j - 1]))
            i = j
        elif w == "|":
            raise ValueError("pipelines are not in the subset")
        else:
            args.append(("word", w))
            i += 1
    head = args[0]
    if head[0] == "word" and head[1] in ("and", "or"):
        result: Any = None
        for a in args[1:]:  # Go 1.18+: short-circuit, returns the deciding argument
            result = _arg(a, dot, scope)
            if _truthy(result) != (head[1] == "and"):
                return result
        return result
    if head[0] == "word" and head[1] in FUNCS:
        return FUNCS[head[1]](*[_arg(a, dot, scope) for a in args[1:]])
    if len(args) != 1:
        raise ValueError(f"unsupported command {words}")
    return _arg(head, dot, scope)


def _arg(a: tuple[str, Any], dot: Any, scope: dict[str, Any]) -> Any:
    return _eval(a[1], dot, scope) if a[0] == "expr" else _value(a[1], dot, scope)


def _exec(nodes: list[Any], dot: Any, scope: dict[str, Any]) -> str:
    out = []
    for n in nodes:
        if isinstance(n, str):
            out.append(n)
        elif n[0] == "out":
            v = _eval(_WORD.findall(n[1]), dot, scope)
            if not isinstance(v, str | int):
                raise ValueError(f"printing {v!r}")
            out.append(str(v))
        elif n[0] == "if":
            body = next((b for c, b in n[1] if _truthy(_eval(_WORD.findall(c), dot, scope))),
                        n[2])
            out.append(_exec(body, dot, scope))
        else:
            (kvar, vvar), expr, body = n[1], n[2], n[3]
            for i, item in enumerate(_eval(_WORD.findall(expr), dot, scope)):
                inner = {**scope, **({kvar: i, vvar: item} if kvar else {})}
                out.append(_exec(body, item, inner))
    return "".join(out)


def render_go(template: str, messages: list[dict[str, str]]) -> str:
    """What Ollama's TEMPLATE renders for a chat request's `.Messages`."""
    data = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    return _exec(_parse(template), data, {"$": data})


def test_go_renderer_follows_go_template_rules() -> None:
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    tpl = ('{{- range $i, $m := .Messages }}{{ if and (eq $i 0) (ne $m.Role "user") }}X'
           '{{ else if eq $m.Role "user" }}[{{ $m.Content }}]\n{{- else }}<{{ .Content }}>'
           '{{ end }}{{ end }}\n  {{- "end" -}}\n  !')
    assert render_go(tpl, msgs) == "[a]<b>end!"
    with pytest.raises(KeyError):
        render_go("{{ range .Messages }}{{ .Text }}{{ end }}", msgs)
    with pytest.raises(ValueError):
        render_go("{{ range .Messages }}{{ .Content | upper }}{{ end }}", msgs)


# --- Modelfile ------------------------------------------------------------------------------

CONVERSATIONS = (
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "system", "content": "You answer in one line."},
     {"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Tom has 12 apples and buys 345 more.\nHow many now?"}],
)

# SmolLM2-Instruct's template: ChatML with a default system turn.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama-3 style: content trimmed, which fixed text around each turn cannot do.
TRIMMING_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def parse_modelfile(path: Path) -> dict[str, Any]:
    """FROM, TEMPLATE (None when absent), PARAMETER stop values and other parameters."""
    text = path.read_text()
    tpl = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)
    rest = text[:tpl.start()] + text[tpl.end():] if tpl else text
    lines = [ln for ln in rest.splitlines() if ln.strip() and not ln.startswith("#")]
    params = [ln.split(None, 2)[1:] for ln in lines if ln.startswith("PARAMETER ")]
    return {"from": next(ln.split(None, 1)[1] for ln in lines if ln.startswith("FROM ")),
            "template": tpl.group(1) if tpl else None, "text": text,
            "stop": [json.loads(v) for k, v in params if k == "stop"],
            "params": {k: v for k, v in params if k != "stop"},
            "other": [ln for ln in lines if not ln.startswith(("FROM ", "PARAMETER "))]}


def assert_template_matches(template: str, tok: Any) -> None:
    for conv in CONVERSATIONS:
        want = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        assert render_go(template, conv) == want, conv


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BPE tokenizer (role-tag chat template) saved once."""
    out = tmp_path_factory.mktemp("tok")
    make_tokenizer(out, ["What is 2 + 3? The answer is 5.", "Tom has 12 apples and buys 345"])
    return out


def _tokenizer(tok_dir: Path, template: str | None = "keep", out: Path | None = None) -> Any:
    """A fresh copy of the tiny tokenizer, its chat template replaced unless "keep", saved to
    `out` when given."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    if template != "keep":
        tok.chat_template = template
    if out is not None:
        tok.save_pretrained(out)
    return tok


@pytest.mark.parametrize("template", [None, SMOLLM2_TEMPLATE], ids=["role-tags", "chatml"])
def test_modelfile_template_renders_the_jinja_chat_template(tok_dir: Path, template: str | None,
                                                            tmp_path: Path) -> None:
    from distill.export.modelfile import write_modelfile

    tiny_tok = _tokenizer(tok_dir, template or "keep", tmp_path)
    note = write_modelfile(tmp_path, GGUF_FILE)
    mf = parse_modelfile(tmp_path / MODELFILE)
    assert mf["from"] == f"./{GGUF_FILE}" and mf["other"] == [], mf["text"]
    assert mf["template"] is not None and "TEMPLATE from the chat template" in note, note
    assert_template_matches(mf["template"], tiny_tok)
    assert mf["stop"] == ["</s>"] and mf["params"] == {"temperature": "0"}
    # The check can fail: without any one of the TEMPLATE's newlines, some conversation renders
    # differently.
    tpl = mf["template"]
    for at in [i for i, c in enumerate(tpl) if c == "\n"]:
        with pytest.raises(AssertionError):
            assert_template_matches(tpl[:at] + tpl[at + 1:], tiny_tok)


def test_untranslatable_template_gets_no_template_line(tok_dir: Path, tmp_path: Path) -> None:
    from distill.export.modelfile import write_modelfile

    tiny_tok = _tokenizer(tok_dir, TRIMMING_TEMPLATE, tmp_path)
    note = write_modelfile(tmp_path, GGUF_FILE)
    mf = parse_modelfile(tmp_path / MODELFILE)
    assert mf["template"] is None and "TEMPLATE" not in mf["text"].replace("# no TEMPLATE", "")
    assert "no TEMPLATE" in note and "differently" in note, note
    turns, why = translate(jinja_render(tiny_tok))
    assert turns is None and why in note


# --- gguf_type ------------------------------------------------------------------------------

def test_gguf_type_takes_llama_cpp_names_in_either_case(tmp_path: Path) -> None:
    assert ExportConfig(gguf_type="Q4_K_M").gguf_type == "q4_k_m"
    assert ExportConfig(gguf_type="Q8_0").gguf_type == "q8_0"
    path = _project(tmp_path, tmp_path / "no-teacher", ["gguf"])
    assert load_config(path, ["export.gguf_type=Q5_K_M"]).export.gguf_type == "q5_k_m"
    with pytest.raises(ConfigError) as err:
        load_config(path, ["export.gguf_type=q3_k_s"])
    assert "export.gguf_type" in str(err.value) and "\n" not in str(err.value)


def test_quantized_types_without_llama_cpp_are_a_config_error(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """Said before the f32 conversion is paid for; the stage records it as the skip reason."""
    import importlib.util

    from distill.export import gguf_export

    with pytest.raises(ConfigError, match="export.gguf_type: 'q4_k_s' is not one of"):
        gguf_export.write_gguf(tmp_path, tmp_path / "out", qtype="q4_k_s")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llama_cpp" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match="q4_k_m is made by llama.cpp's quantizer, which needs "
                                          "llama-cpp-python"):
        gguf_export.write_gguf(tmp_path, tmp_path / "out", qtype="q4_k_m")
    assert not (tmp_path / "out").exists()


def _tiny_lm(tok_dir: Path, out: Path, hidden: int) -> Path:
    """A one-layer tiny Llama with the tiny tokenizer (which the converter does not know: the
    hand-written writer makes the f32 file)."""
    make_tiny_lm(out, _tokenizer(tok_dir), hidden=hidden, layers=1)
    return out


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory, tok_dir: Path) -> Path:
    """Rows of 256 and 512 values: whole K-quant super-blocks."""
    return _tiny_lm(tok_dir, tmp_path_factory.mktemp("tiny256"), 256)


def _llama_cpp() -> None:
    pytest.importorskip("llama_cpp")


@pytest.mark.parametrize("qtype,ftype,main_type", [("q4_k_m", 15, "Q4_K"), ("q6_k", 18, "Q6_K"),
                                                   ("q4_0", 2, "Q4_0")])
def test_tiny_model_quantized_by_llama_cpp(tiny_lm: Path, tmp_path: Path, qtype: str,
                                           ftype: int, main_type: str) -> None:
    from distill.export.gguf_export import write_gguf
    from distill.export.gguf_file import read_gguf, tensor_type_counts
    from distill.export.gguf_runtime import LlamaCppRunner

    _llama_cpp()
    info = write_gguf(tiny_lm, tmp_path, qtype=qtype, converter="builtin")
    meta, _ = read_gguf(tmp_path / GGUF_FILE, tensors=False)
    assert int(meta["general.file_type"]) == ftype
    counts, off_rows = tensor_type_counts(tmp_path / GGUF_FILE, 256)
    assert counts.get(main_type, 0) >= 4 and off_rows == 0, counts
    quant_note = next(n for n in info["notes"] if "llama_model_quantize" in n)
    assert f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}" in quant_note and main_type in quant_note
    assert "fallback" not in quant_note
    # the quantized tensors, read back against the f32 file, are near it
    assert 0 < info["roundtrip"]["max_abs_diff"] < 0.1, info["roundtrip"]
    # only model.gguf counts as weights: the f32 intermediate is gone
    assert sorted(p.name for p in tmp_path.iterdir() if "gguf" in p.name) == [GGUF_FILE]
    assert weight_bytes(tmp_path) == (tmp_path / GGUF_FILE).stat().st_size
    assert meta["tokenizer.chat_template"] and (tmp_path / MODELFILE).is_file()
    runner = LlamaCppRunner(tmp_path, threads=1)
    try:
        assert runner.chat_api, runner.describe()  # llama.cpp tokenizes this tokenizer alike
        messages = [{"role": "user", "content": "What is 2 + 3?"}]
        ans, loop = runner.chat(messages, 6), Runner.chat(runner, messages, 6)
        assert ans.prompt_tokens > 0 and (len(ans.token_ids) == 6 or ans.finish_reason == "stop")
        assert (ans.text, ans.token_ids, ans.finish_reason) == \
            (loop.text, loop.token_ids, loop.finish_reason)
    finally:
        runner.close()


def test_chat_api_only_with_the_students_template(tiny_lm: Path, tmp_path: Path) -> None:
    """A GGUF whose embedded template no longer renders as the student's (here: the tokenizer
    beside it was given another one) answers through the token loop, and says why."""
    from distill.export.gguf_export import write_gguf
    from distill.export.gguf_runtime import LlamaCppRunner

    _llama_cpp()
    write_gguf(tiny_lm, tmp_path, qtype="q8_0", converter="builtin")
    tok = _tokenizer(tmp_path, SMOLLM2_TEMPLATE)
    tok.save_pretrained(tmp_path)
    runner = LlamaCppRunner(tmp_path, threads=1)
    try:
        said = runner.describe()
        assert runner.own_tokenizer and not runner.chat_api
        assert "token loop" in said["answers"] and any("renders differently" in n
                                                       for n in said["notes"]), said
        ans = runner.chat([{"role": "user", "content": "What is 2 + 3?"}], 3)
        assert ans.prompt_tokens == len(runner.encode_chat(
            [{"role": "user", "content": "What is 2 + 3?"}]))
    finally:
        runner.close()


def test_k_quant_rows_off_256_get_llama_cpp_fallbacks(tok_dir: Path, tmp_path: Path) -> None:
    """Rows of 32: llama.cpp gives q4_K tensors q5_0 instead; the notes say so."""
    from distill.export.gguf_export import write_gguf
    from distill.export.gguf_file import tensor_type_counts

    _llama_cpp()
    src = _tiny_lm(tok_dir, tmp_path / "src", 32)
    info = write_gguf(src, tmp_path / "gguf", qtype="q4_k_m", converter="builtin")
    counts, off_rows = tensor_type_counts(tmp_path / "gguf" / GGUF_FILE, 256)
    assert "Q4_K" not in counts and "Q5_0" in counts and off_rows > 0, counts
    note = next(n for n in info["notes"] if "llama_model_quantize" in n)
    assert f"{off_rows} tensors have rows not a multiple of 256" in note, note


# --- the real model: SmolLM2-135M-Instruct ----------------------------------------------------

REAL_PROMPTS = ("What is 2 + 3?",
                "Tom has 12 apples and buys 345 more. How many apples does he have?",
                "Name three colors.")


@pytest.fixture(scope="module")
def real_gguf(tmp_path_factory: pytest.TempPathFactory, real_model: Path) -> dict[str, Any]:
    """SmolLM2-135M-Instruct as Q8_0 (the converter) and Q4_K_M (f32, then llama.cpp's
    quantizer), exported once."""
    from distill.export.gguf_export import write_gguf
    from tests.test_export_real import _converter

    _llama_cpp()
    _converter()
    root = tmp_path_factory.mktemp("real-gguf")
    out = {}
    for qtype in ("q8_0", "q4_k_m"):
        info = write_gguf(real_model, root / qtype, qtype=qtype, name="smollm2")
        out[qtype] = {"path": root / qtype, "info": info}
    return out


@pytest.mark.real
@pytest.mark.parametrize("qtype,ftype", [("q8_0", 7), ("q4_k_m", 15)])
def test_real_gguf_carries_type_template_and_stop_tokens(real_gguf: dict[str, Any],
                                                         real_model: Path, qtype: str,
                                                         ftype: int) -> None:
    from distill.export.gguf_file import read_gguf
    from distill.export.runtime import load_tokenizer_dir

    path = real_gguf[qtype]["path"]
    notes = real_gguf[qtype]["info"]["notes"]
    meta, _ = read_gguf(path / GGUF_FILE, tensors=False)
    tok = load_tokenizer_dir(real_model)
    assert int(meta["general.file_type"]) == ftype
    assert "convert_hf_to_gguf" in notes[0], notes
    assert ("llama_model_quantize" in " ".join(notes)) == (qtype == "q4_k_m"), notes
    assert meta["tokenizer.chat_template"] == tok.chat_template
    assert int(meta["tokenizer.ggml.eos_token_id"]) == tok.eos_token_id
    assert tok.eos_token == "<|im_end|>"
    mf = parse_modelfile(path / MODELFILE)
    assert mf["template"] is not None and "<|im_end|>" in mf["stop"], mf["text"]
    assert "You are a helpful AI assistant named SmolLM" in mf["template"]
    assert_template_matches(mf["template"], tok)


@pytest.fixture(scope="module")
def real_runners(real_gguf: dict[str, Any]) -> Any:
    from distill.export.gguf_runtime import LlamaCppRunner

    runners = {q: LlamaCppRunner(g["path"], threads=1) for q, g in real_gguf.items()}
    yield runners
    for r in runners.values():
        r.close()


@pytest.mark.real
@pytest.mark.parametrize("qtype", ["q8_0", "q4_k_m"])
def test_real_gguf_answers_through_the_chat_api_like_the_token_loop(real_runners: Any,
                                                                    qtype: str) -> None:
    """Greedy llama.cpp chat completion (its tokenizer, the GGUF's template) gives the same
    tokens and text as the shared greedy loop over the same weights."""
    runner = real_runners[qtype]
    assert runner.own_tokenizer and runner.chat_api, runner.describe()
    said = runner.describe()
    assert said["tokenizer"] == "llama.cpp" and "create_chat_completion" in said["answers"]
    for prompt in REAL_PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        api = runner.chat(messages, 24)
        loop = Runner.chat(runner, messages, 24)
        assert api.text and api.text == loop.text, (prompt, api, loop)
        assert (api.token_ids, api.finish_reason, api.prompt_tokens) == \
            (loop.token_ids, loop.finish_reason, loop.prompt_tokens), prompt


@pytest.mark.real
def test_real_q4_k_m_is_smaller_and_still_answers(real_gguf: dict[str, Any],
                                                  real_runners: Any) -> None:
    q8, q4 = (weight_bytes(real_gguf[q]["path"]) for q in ("q8_0", "q4_k_m"))
    assert q4 < 0.85 * q8, (q4, q8)
    note = next(n for n in real_gguf["q4_k_m"]["info"]["notes"] if "quantize" in n)
    assert "rows not a multiple of 256" in note, note  # hidden 576: fallbacks for some
    ans = real_runners["q4_k_m"].chat([{"role": "user", "content": "What is 2 + 3?"}], 16)
    assert "5" in ans.text, ans  # "2 + 3 = 5", as Q8_0 says
