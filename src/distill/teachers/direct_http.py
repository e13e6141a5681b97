"""The chat endpoint over a bare `httpx2.AsyncClient`: the teacher's hot path without the SDK.

The `openai` SDK spends ~2-3 ms of CPU per request building and validating typed requests and
responses the teacher never uses (it reads the raw body itself). On a small machine that CPU,
not the server, caps requests per second. This client posts orjson-encoded bodies and returns
the raw bytes; failures are raised as the SDK's own exception types (`APIStatusError` with the
error body, `APITimeoutError`, `APIConnectionError` chained to the transport error), so the
teacher's retry, Retry-After, rate-limit and failover policy reads them exactly as before.
`teacher.http_client: sdk` goes back to the SDK; the Batch API always uses the SDK.
"""

from __future__ import annotations

from typing import Any

import httpx2
import openai
import orjson


class DirectClient:
    """One replica's `/chat/completions` and `/models`, with pooled keep-alive connections."""

    def __init__(self, base_url: str, api_key: str, *, timeout: httpx2.Timeout,
                 limits: httpx2.Limits) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx2.AsyncClient(
            base_url=self.base_url + "/", timeout=timeout, limits=limits,
            headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json",
                     "Accept": "application/json"})

    def __repr__(self) -> str:  # never the headers: they hold the key
        return f"DirectClient({self.base_url!r})"

    async def chat(self, kwargs: dict[str, Any]) -> bytes:
        """POST the request the SDK would send for `kwargs`; the raw body of a 2xx answer, or
        an SDK exception."""
        return await self._call("POST", "chat/completions", request_body(kwargs))

    async def probe(self, timeout: float) -> None:
        await self._call("GET", "models", None, timeout=timeout)

    async def _call(self, method: str, path: str, content: bytes | None,
                    timeout: float | None = None) -> bytes:
        kw: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        try:
            resp = await self._http.request(method, path, content=content, **kw)
        except httpx2.TimeoutException as err:
            raise openai.APITimeoutError(request=_request(err, method, path)) from err
        except httpx2.TransportError as err:
            raise openai.APIConnectionError(request=_request(err, method, path)) from err
        if resp.status_code >= 400:
            raise _status_error(resp)
        return resp.content

    async def close(self) -> None:
        await self._http.aclose()


def _request(err: httpx2.TransportError, method: str, path: str) -> httpx2.Request:
    try:
        return err.request
    except RuntimeError:
        return httpx2.Request(method, path)


def _status_error(resp: httpx2.Response) -> openai.APIStatusError:
    """What the SDK raises for this response: the error object as `body`, code/type/param."""
    try:
        body: Any = orjson.loads(resp.content)
    except orjson.JSONDecodeError:
        body = resp.text
    data = body.get("error", body) if isinstance(body, dict) else body
    return openai.APIStatusError(f"Error code: {resp.status_code} - {body}", response=resp,
                                 body=data)


def request_body(kwargs: dict[str, Any]) -> bytes:
    """The JSON body the SDK would send for `kwargs`: `extra_body` merged into the top level."""
    if "extra_body" not in kwargs:
        return orjson.dumps(kwargs)
    body = dict(kwargs)
    body.update(body.pop("extra_body") or {})
    return orjson.dumps(body)
