"""Prompt templates: Jinja2 in a sandbox, undefined variables are errors (exit 2)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import StrictUndefined, TemplateError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment

from distill.config import ConfigError

_ENV = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False,
                            trim_blocks=True, lstrip_blocks=True, autoescape=False)


@lru_cache(maxsize=64)
def _load(path: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: template not found")
    try:
        return _ENV.from_string(p.read_text())
    except TemplateError as err:
        raise ConfigError(f"{path}: invalid template ({err})") from None


def render(path: str | Path, field: str = "prompt", **variables: Any) -> str:
    """Render a template file; an undefined variable names the file, the field and the name."""
    try:
        return _load(str(path)).render(**variables).strip()
    except UndefinedError as err:
        raise ConfigError(f"{path}: {field}: undefined variable ({err.message})") from None
    except TemplateError as err:
        raise ConfigError(f"{path}: {field}: template error ({err})") from None


def chat_messages(path: str | Path, system: str | None = None, **variables: Any
                  ) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": render(path, **variables)})
    return msgs
