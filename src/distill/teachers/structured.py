"""Structured outputs: a JSON schema the teacher must answer in, checked on receipt.

`generate.response_format` is a JSON schema, a `{name, schema, strict}` wrapper, or the
"module:Class" path of a pydantic model. It becomes the OpenAI `response_format`

    {"type": "json_schema", "json_schema": {"name": ..., "schema": ..., "strict": ...}}

sent with every request (online or in a batch). Servers that honour it (OpenAI, vLLM, SGLang)
constrain decoding; others may not, and a response can still be cut by `max_tokens`. So every
response is parsed and validated against the schema: invalid JSON or a mismatch is a content
failure the teacher retries, and an error row after `max_retries`.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from distill.config import ConfigError

_NAME_OK = re.compile(r"[^a-zA-Z0-9_-]")


def _load_model(path: str, search: Path | None) -> Any:
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise ConfigError(f"generate.response_format: {path!r}: expected 'module:Class' (a "
                          "pydantic model) or a JSON schema mapping")
    if search is not None and str(search) not in sys.path:
        sys.path.append(str(search))  # a schemas.py beside the pipeline file
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"generate.response_format: cannot import {path!r} ({err})") from None
    if not hasattr(obj, "model_json_schema"):
        raise ConfigError(f"generate.response_format: {path!r} is not a pydantic model")
    return obj


def _strict_schema(model: Any) -> dict[str, Any]:
    """The pydantic model's schema in OpenAI's strict form (every property required, no extra
    properties), as the SDK's own `parse()` helper sends it."""
    try:
        from openai.lib._pydantic import to_strict_json_schema
    except ImportError:  # pragma: no cover - older or newer SDK without the helper
        return dict(model.model_json_schema())
    return to_strict_json_schema(model)


def response_format(spec: dict[str, Any] | str | None, search: Path | None = None
                    ) -> dict[str, Any] | None:
    """The `response_format` request field for `generate.response_format` (None: free text).
    `search`: a directory to import "module:Class" from besides sys.path (the pipeline's)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        model = _load_model(spec, search)
        name, schema, strict = model.__name__, _strict_schema(model), True
    elif isinstance(spec.get("schema"), dict):
        name = str(spec.get("name") or spec["schema"].get("title") or "response")
        schema, strict = spec["schema"], bool(spec.get("strict", True))
    else:
        name, schema, strict = str(spec.get("title") or "response"), spec, True
    try:
        checker(json.dumps(schema, sort_keys=True))
    except Exception as err:  # noqa: BLE001 - any schema error is the user's config
        raise ConfigError(f"generate.response_format: not a valid JSON schema: {err}") from None
    return {"type": "json_schema",
            "json_schema": {"name": _NAME_OK.sub("_", name)[:64] or "response",
                            "schema": schema, "strict": strict}}


@lru_cache(maxsize=32)
def checker(schema_json: str) -> Any:
    """A jsonschema validator for the schema (cached: every response of a run uses one)."""
    import jsonschema

    schema = json.loads(schema_json)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def validate(text: str, fmt: dict[str, Any]) -> tuple[Any, str | None]:
    """(the parsed value, None) when `text` is JSON matching the format's schema, else
    (None, why)."""
    stripped = text.strip()
    if stripped.startswith("```"):  # some servers fence JSON even when asked for a schema
        stripped = re.sub(r"^```(?:json)?\s*|\s*```$", "", stripped)
    try:
        value = json.loads(stripped)
    except json.JSONDecodeError as err:
        return None, f"invalid JSON ({err.msg} at char {err.pos})"
    schema = (fmt.get("json_schema") or {}).get("schema")
    if isinstance(schema, dict):
        error = next(iter(checker(json.dumps(schema, sort_keys=True)).iter_errors(value)), None)
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(root)"
            return None, f"schema mismatch at {where}: {error.message[:160]}"
    return value, None
