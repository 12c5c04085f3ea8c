"""HTTP client for one SGLang server: JSON in, JSON out, timeouts retried with backoff.

Every payload is checked against the pinned request types (protocol.py) before it is sent. A
request that times out or cannot connect is retried `max_retries` times with exponential backoff
(tenacity), each retry under a fresh request id; if it still fails the server is taken to be down (ServerUnreachable) and the engine
decides whether to restart it. An HTTP error status is not retried: it means the request was wrong.
"""
import time
from typing import Any, List, Mapping, Optional

import requests
from requests.adapters import HTTPAdapter
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from ..errors import RolloutError
from .protocol import DEFAULT_WEIGHT_UPDATE_GROUP, check_request


class ServerUnreachable(RolloutError):
    """The server did not answer (connection refused or reset, or timed out on every retry)."""


def _with_attempt_rid(payload: Optional[Mapping], attempt_number: int) -> Optional[Mapping]:
    """A retry gets its own request id: the timed-out attempt may still be running on the server,
    which refuses an id already in flight (HTTP 400 "Duplicate request ID")."""
    if payload is None or "rid" not in payload or attempt_number == 1:
        return payload
    return {**payload, "rid": f"{payload['rid']}-retry{attempt_number - 1}"}


class SGLangClient:
    def __init__(
        self,
        url: str,
        request_timeout_s: float,
        max_retries: int,
        retry_backoff_s: float = 1.0,
        max_connections: int = 64,
    ):
        self.url = url.rstrip("/")
        self.request_timeout_s = request_timeout_s
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=max_connections)
        self.session.mount("http://", adapter)

    # ---- transport ----
    def _send(self, method: str, route: str, payload: Optional[Mapping], timeout_s: float) -> requests.Response:
        retrying = Retrying(
            retry=retry_if_exception_type((requests.Timeout, requests.ConnectionError)),
            stop=stop_after_attempt(self.max_retries + 1),
            wait=wait_exponential(multiplier=self.retry_backoff_s, max=60 * self.retry_backoff_s),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    body = _with_attempt_rid(payload, attempt.retry_state.attempt_number)
                    return self.session.request(method, self.url + route, json=body, timeout=timeout_s)
        except (requests.Timeout, requests.ConnectionError) as error:
            raise ServerUnreachable(
                f"SGLang server {self.url} did not answer {route} after {self.max_retries + 1} attempts: {error}"
            ) from error

    def post(self, route: str, payload: Optional[Mapping] = None, timeout_s: Optional[float] = None) -> Any:
        """POST a checked payload; the decoded JSON answer (None for an empty body)."""
        payload = {} if payload is None else dict(payload)
        check_request(route, payload)
        response = self._send("POST", route, payload, timeout_s or self.request_timeout_s)
        return self._decode(route, response)

    def _decode(self, route: str, response: requests.Response) -> Any:
        if response.status_code >= 400:
            raise RolloutError(
                f"SGLang server {self.url} refused {route} (HTTP {response.status_code}): {response.text[:2000]}"
            )
        if not response.content:
            return None
        try:
            body = response.json()
        except ValueError:
            return response.text
        if isinstance(body, dict) and body.get("success") is False:
            raise RolloutError(f"SGLang server {self.url} failed {route}: {body.get('message')}")
        return body

    # ---- health ----
    def is_healthy(self, timeout_s: float = 5.0) -> bool:
        """True when GET /health answers 200 (the server generated a token or is busy generating)."""
        try:
            return self.session.get(self.url + "/health", timeout=timeout_s).status_code == 200
        except requests.RequestException:
            return False

    # ---- generation ----
    def generate(self, payload: Mapping) -> Any:
        return self.post("/generate", payload)

    # ---- weight updates ----
    def begin_weight_update(self) -> None:
        self.post("/begin_weight_update", {})

    def end_weight_update(self) -> None:
        self.post("/end_weight_update", {})

    def update_weights_from_tensor(self, payload: Mapping) -> None:
        self.post("/update_weights_from_tensor", payload)

    def update_weights_from_distributed(self, payload: Mapping) -> None:
        self.post("/update_weights_from_distributed", payload)

    def init_weights_update_group(self, payload: Mapping) -> None:
        self.post("/init_weights_update_group", payload)

    def destroy_weights_update_group(self, group_name: str = DEFAULT_WEIGHT_UPDATE_GROUP) -> None:
        self.post("/destroy_weights_update_group", {"group_name": group_name})

    def flush_cache(self, attempts: int = 60, interval_s: float = 1.0) -> None:
        """Flush the prefix cache; SGLang refuses (HTTP 400) while requests run, so retry a while."""
        for _ in range(attempts):
            check_request("/flush_cache", {})
            response = self._send("POST", "/flush_cache", None, self.request_timeout_s)
            if response.status_code == 200:
                return
            time.sleep(interval_s)
        raise RolloutError(f"SGLang server {self.url} kept refusing /flush_cache ({attempts} attempts): requests still running")

    # ---- memory ----
    def release_memory_occupation(self, tags: Optional[List[str]] = None) -> None:
        self.post("/release_memory_occupation", {"tags": tags})

    def resume_memory_occupation(self, tags: Optional[List[str]] = None) -> None:
        self.post("/resume_memory_occupation", {"tags": tags})

    def close(self) -> None:
        self.session.close()
