"""What the sync and the asyncio client share: their settings, credentials and request building."""

from __future__ import annotations

from collections.abc import Mapping

from services.client.request import CachePolicy, Prompt, build_request
from services.client.retry import Attempts, RetryPolicy
from services.common.pb import gateway_pb2


class ClientBase:
    """Settings of a gateway client. The API key only ever leaves in the call metadata: it is kept in
    no public attribute and never shown by repr."""

    def __init__(self, target: str, api_key: str, *, model: str = "", timeout: float | None = 60.0,
                 retry: RetryPolicy | None = None) -> None:
        if not api_key:
            raise ValueError("api_key is empty")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds or None, not {timeout}")
        self.target = target
        self.model = model
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._metadata = (("authorization", f"Bearer {api_key}"),)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(target={self.target!r}, api_key=<hidden>, model={self.model!r}, "
                f"timeout={self.timeout!r}, retry={self.retry!r})")

    def _prepare(self, prompt: Prompt, model: str | None, cache: CachePolicy | None, priority: int,
                 allow_sampled_cache: bool, timeout: float | None,
                 sampling: Mapping[str, object], user: str = "") -> tuple[gateway_pb2.GatewayRequest, Attempts]:
        req = build_request(prompt, self.model if model is None else model, cache, priority, allow_sampled_cache,
                            sampling)
        req.user = user
        return req, Attempts(self.retry, self.timeout if timeout is None else timeout)
