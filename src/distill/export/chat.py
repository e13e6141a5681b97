"""`distill chat RUN_DIR`: talk to an exported artifact in its own runtime.

Each question is one single-turn conversation (a small student has a short context). When the
run's prompt template (`generate.prompt` in RUN_DIR/config.yaml) can be found, questions are
wrapped in it, as the student saw them in training; `--raw` sends the text as it is.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from distill.config import ConfigError
from distill.export.formats import get_format, load_runner
from distill.export.runtime import Runner


def artifact_path(run_dir: Path, fmt: str) -> Path:
    """Where RUN_DIR's `fmt` artifact lives (export.json's record, else export/<fmt>)."""
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: run directory not found")
    get_format(fmt)  # an unknown name is a ConfigError naming the known ones
    export_json = run_dir / "export" / "export.json"
    if export_json.is_file():
        try:
            doc = json.loads(export_json.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{export_json}: invalid JSON ({err.msg})") from None
        for a in doc.get("artifacts", []):
            if a.get("format") == fmt and a.get("path"):
                p = Path(a["path"])
                return p if p.is_absolute() else run_dir / p
    return run_dir / "export" / fmt


def prompt_wrapper(run_dir: Path) -> Callable[[str], list[dict[str, str]]] | None:
    """The run's prompt template as a question → messages function, when it can be found."""
    from distill.generate.templates import chat_messages

    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        return None
    data: dict[str, Any] = yaml.safe_load(cfg_path.read_text()) or {}
    gen = data.get("generate") or {}
    prompt, system = gen.get("prompt"), gen.get("system_prompt")
    if not prompt:
        return None
    for root in (Path.cwd(), run_dir.parent, run_dir.parent.parent):
        if (root / prompt).is_file():
            path = root / prompt
            return lambda q: chat_messages(path, system, question=q)
    return None


def open_runner(run_dir: Path, fmt: str, threads: int | None = None) -> Runner:
    return load_runner(fmt, artifact_path(run_dir, fmt), threads=threads)


def chat_session(run_dir: Path, fmt: str, prompt: str | None, lines: Iterable[str],
                 write: Callable[[str], None], *, max_tokens: int = 256, raw: bool = False,
                 threads: int | None = None) -> int:
    """Answer `prompt`, or every non-empty line of `lines` until EOF. Returns answers given."""
    runner = open_runner(run_dir, fmt, threads)
    wrap = None if raw else prompt_wrapper(run_dir)

    def answer(text: str) -> None:
        messages = wrap(text) if wrap else [{"role": "user", "content": text}]
        write(runner.chat(messages, max_tokens).text)

    try:
        if prompt is not None:
            answer(prompt)
            return 1
        n = 0
        for line in lines:
            if line.strip():
                answer(line.strip())
                n += 1
        return n
    finally:
        runner.close()
