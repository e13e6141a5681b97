"""The HTTP clients of the OpenAI-compatible teacher: endpoints, the API key, one client a replica.

`teacher.http_client` picks the client: `direct` (aiohttp, the default) or `httpx` post raw
bodies without the SDK's per-request CPU cost (`direct_aiohttp`, `direct_http`); `sdk` is the
official `AsyncOpenAI`. All of them raise the SDK's exception types, so `openai_wire.classify`
reads every failure alike.

The API key is read from the environment variable `api_key_env` names, handed to the clients and
never kept anywhere else, written to a file or put in an error message (`scrub`).
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlparse

from distill.config import ConfigError, TeacherConfig
from distill.teachers.replicas import Replica

DEFAULT_BASE_URL = "https://api.openai.com/v1"
LOCAL_DUMMY_KEY = "EMPTY"
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "host.docker.internal"}


def base_urls(base_url: str | list[str] | None) -> list[str]:
    urls = [base_url] if isinstance(base_url, str) else list(base_url or [])
    urls = [u.rstrip("/") for u in urls if u and u.strip()]
    return urls or [DEFAULT_BASE_URL]


def is_local(url: str) -> bool:
    host = (urlparse(url).hostname or "").lower()
    return host in _LOCAL_HOSTS or host.startswith("127.") or host.endswith(".localhost")


def read_api_key(cfg: TeacherConfig, urls: list[str]) -> str:
    """The key from the environment, a dummy for local servers, or a ConfigError naming the var."""
    name = cfg.api_key_env
    key = os.environ.get(name) if name else None
    if key:
        return key
    if name is None or all(is_local(u) for u in urls):
        return LOCAL_DUMMY_KEY
    raise ConfigError(f"teacher.api_key_env: environment variable {name} is not set "
                      f"(needed for {urlparse(urls[0]).hostname})")


def scrub(cfg: TeacherConfig, text: str) -> str:
    """Error text never carries the key, even when a server echoes it back."""
    name = cfg.api_key_env
    key = os.environ.get(name) if name else None
    if key and len(key) >= 6:
        text = text.replace(key, "***")
    return text


def direct_client(name: str) -> Any:
    """The bare HTTP client class `teacher.http_client` names (`direct`: the default one)."""
    if name == "httpx":
        from distill.teachers.direct_http import DirectClient

        return DirectClient
    from distill.teachers.direct_aiohttp import AiohttpClient

    return AiohttpClient


def open_replicas(cfg: TeacherConfig, urls: list[str]) -> list[Replica]:
    """One client per endpoint, on the running event loop, with SDK retries off (the teacher
    owns the retry policy) and connection pools sized for `max_concurrency`."""
    import httpx2
    from openai import AsyncOpenAI, DefaultAsyncHttpxClient

    key = read_api_key(cfg, urls)
    timeout = httpx2.Timeout(cfg.timeout_s, connect=min(cfg.timeout_s, 10.0))
    limits = httpx2.Limits(max_connections=cfg.max_concurrency * 2 + 8,
                           max_keepalive_connections=cfg.max_concurrency + 8)
    if cfg.http_client != "sdk":
        client_cls = direct_client(cfg.http_client)
        return [Replica(url=url, client=client_cls(url, key, timeout=timeout, limits=limits))
                for url in urls]
    return [Replica(url=url, client=AsyncOpenAI(
                base_url=url, api_key=key, max_retries=0, timeout=timeout,
                http_client=DefaultAsyncHttpxClient(timeout=timeout, limits=limits)))
            for url in urls]


async def probe(replica: Replica, *, direct: bool, timeout_s: float) -> bool:
    """`GET /models` on a replica back from a cooldown (raises when it is still down).
    `direct`: the replica's client is a direct one (not the SDK's)."""
    if direct:
        await replica.client.probe(min(5.0, timeout_s))
    else:
        await replica.client.models.list(timeout=min(5.0, timeout_s))
    return True


async def send(replica: Replica, kwargs: dict[str, Any], *, direct: bool) -> bytes:
    """POST one chat request; the raw body of a 2xx answer, or the SDK's exception."""
    if direct:
        content: bytes = await replica.client.chat(kwargs)
        return content
    raw = await replica.client.chat.completions.with_raw_response.create(**kwargs)
    return raw.content
