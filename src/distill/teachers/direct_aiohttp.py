"""The chat endpoint over a bare `aiohttp.ClientSession`: the direct client with less CPU.

Same interface and the same failures as `direct_http.DirectClient` (httpx): orjson-encoded
bodies out, raw bytes back, and every failure raised as the `openai` SDK's own exception type
(`APIStatusError` carrying the status, headers and error body, `APITimeoutError`,
`APIConnectionError` chained to the transport error), so the teacher's retry, Retry-After,
rate-limit and failover policy reads them exactly as before. httpx objects are only built for
those exceptions, never on the hot path.

Where the CPU goes instead: httpcore scans its whole pool and polls every idle socket on each
request (~1 ms per request at 64 connections on a small machine); aiohttp's connector hands out
a keep-alive connection in O(1) and parses responses in C. Timeouts follow httpx's meaning:
`connect` to open a connection, `read` the longest wait for the next bytes, `pool` the longest
wait for a free connection. Proxies come from the environment (HTTP(S)_PROXY, NO_PROXY), as
with httpx, resolved once per client; TLS verifies against certifi's CA bundle, as httpx does.
"""

from __future__ import annotations

import ssl
import urllib.request
from typing import Any

import aiohttp
import httpx2
import openai
import orjson
from yarl import URL

from distill.teachers.direct_http import request_body


def _ssl_context() -> ssl.SSLContext:
    try:
        import certifi
    except ImportError:  # pragma: no cover - httpx depends on certifi
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())


def _env_proxy(url: URL) -> str | None:
    """The proxy the environment names for `url` (None: connect directly)."""
    host = url.host or ""
    if not host or urllib.request.proxy_bypass(host):
        return None
    return urllib.request.getproxies().get(url.scheme)


class AiohttpClient:
    """One replica's `/chat/completions` and `/models`, with pooled keep-alive connections."""

    def __init__(self, base_url: str, api_key: str, *, timeout: httpx2.Timeout,
                 limits: httpx2.Limits) -> None:
        self.base_url = base_url.rstrip("/")
        base = URL(self.base_url + "/")
        self._chat_url = base.join(URL("chat/completions"))
        self._models_url = base.join(URL("models"))
        self._proxy = _env_proxy(base)
        self._timeout = aiohttp.ClientTimeout(total=None, connect=timeout.pool,
                                              sock_connect=timeout.connect,
                                              sock_read=timeout.read)
        connector = aiohttp.TCPConnector(
            limit=limits.max_connections or 0, limit_per_host=0,
            keepalive_timeout=limits.keepalive_expiry or 5.0,
            ssl=_ssl_context() if base.scheme == "https" else False)
        self._http = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, trust_env=False,
            headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json",
                     "Accept": "application/json"})

    def __repr__(self) -> str:  # never the headers: they hold the key
        return f"AiohttpClient({self.base_url!r})"

    async def chat(self, kwargs: dict[str, Any]) -> bytes:
        """POST the request the SDK would send for `kwargs`; the raw body of a 2xx answer, or
        an SDK exception."""
        return await self._call("POST", self._chat_url, request_body(kwargs))

    async def probe(self, timeout: float) -> None:
        await self._call("GET", self._models_url, None,
                         timeout=aiohttp.ClientTimeout(total=timeout))

    async def _call(self, method: str, url: URL, data: bytes | None,
                    timeout: aiohttp.ClientTimeout | None = None) -> bytes:
        try:
            async with self._http.request(method, url, data=data, proxy=self._proxy,
                                          timeout=timeout or self._timeout) as resp:
                content = await resp.read()
                if resp.status >= 400:
                    raise _status_error(method, url, resp.status, resp.headers, content)
                return content
        except openai.APIStatusError:
            raise
        except (TimeoutError, aiohttp.ClientError, OSError) as err:  # timeouts: TimeoutError
            request = httpx2.Request(method, str(url))
            cause = _as_httpx(err, request)
            cause.__cause__ = err
            if isinstance(cause, httpx2.TimeoutException):
                raise openai.APITimeoutError(request=request) from cause
            raise openai.APIConnectionError(request=request) from cause

    async def close(self) -> None:
        await self._http.close()


def _as_httpx(err: BaseException, request: httpx2.Request) -> httpx2.TransportError:
    """The httpx exception for an aiohttp failure, so a row's error reads the same whichever
    client sent it ("connection error (RemoteProtocolError)"); the aiohttp one is its cause."""
    kind: type[httpx2.TransportError]
    if isinstance(err, aiohttp.ConnectionTimeoutError):
        kind = httpx2.ConnectTimeout
    elif isinstance(err, TimeoutError):
        kind = httpx2.ReadTimeout
    elif isinstance(err, aiohttp.ClientConnectorError):
        kind = httpx2.ConnectError
    elif isinstance(err, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError
                    | aiohttp.ClientResponseError):
        kind = httpx2.RemoteProtocolError
    elif isinstance(err, aiohttp.ClientOSError | OSError):
        kind = httpx2.ReadError
    else:
        kind = httpx2.NetworkError
    return kind(str(err) or type(err).__name__, request=request)


def _status_error(method: str, url: URL, status: int, headers: Any,
                  content: bytes) -> openai.APIStatusError:
    """What the SDK raises for this response: the error object as `body`, code/type/param,
    and an httpx response carrying the headers (Retry-After)."""
    response = httpx2.Response(status, headers=list(headers.items()), content=content,
                               request=httpx2.Request(method, str(url)))
    try:
        body: Any = orjson.loads(content)
    except orjson.JSONDecodeError:
        body = response.text
    data = body.get("error", body) if isinstance(body, dict) else body
    return openai.APIStatusError(f"Error code: {status} - {body}", response=response, body=data)
