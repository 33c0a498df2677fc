"""A Python client of the Strata gateway for other backend services.

    from services.client import StrataClient
    with StrataClient("127.0.0.1:50051", api_key="sk-strata-...") as c:
        r = c.generate("Hello", max_tokens=32, temperature=0.0, timeout=10)
        for chunk in c.stream([{"role": "user", "content": "Hi"}], max_tokens=16):
            print(chunk.text, end="")

AsyncStrataClient has the same surface for asyncio. Results are frozen dataclasses (Result, Chunk, Usage,
Source); failures raise StrataClientError subclasses; UNAVAILABLE is retried per RetryPolicy (a stream only
until its first chunk)."""

from services.client.async_client import AsyncStrataClient
from services.client.errors import (
    AuthError,
    CallTimeoutError,
    InvalidRequestError,
    NotFoundError,
    RateLimitedError,
    ServiceUnavailableError,
    StrataClientError,
)
from services.client.request import CachePolicy, Message, Prompt, Sampling
from services.client.results import Choice, Chunk, Result, Source, TokenLogprob, Usage
from services.client.retry import RetryPolicy
from services.client.sync_client import StrataClient

__all__ = ["AsyncStrataClient", "AuthError", "CachePolicy", "CallTimeoutError", "Choice", "Chunk", "InvalidRequestError",
           "Message", "NotFoundError", "Prompt", "RateLimitedError", "Result", "RetryPolicy", "Sampling", "ServiceUnavailableError",
           "Source", "StrataClient", "StrataClientError", "TokenLogprob", "Usage"]
