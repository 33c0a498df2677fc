"""Background jobs (batches): requests that outlive a call, run later through the gateway's own pipeline at a
priority after every interactive request, with each item's result written once and charged once.

- store.py: the durable state in Redis (jobs, items, results, the work queue, retries, the dead-letter stream,
  uploaded files) and the Lua scripts that change it atomically.
- worker.py: the consumers: run items (retries with backoff and jitter, dead letters, cancellation, expiry) and
  deliver webhooks. They run inside each gateway (`--job-workers`).
- codecs.py: an item's two encodings: a GatewayRequest (gRPC's SubmitJob) or an OpenAI batch line (HTTP's
  /v1/batches), and their results.
- webhooks.py: HMAC-SHA256 signatures and delivery.

Why Redis Streams and not a job library (arq, taskiq): exactly-once needs an item's result, its usage charge and
the acknowledgement of its queue message to be one atomic write (one Lua script), and a library owns its own
acknowledgement and result store. arq keeps jobs in a sorted set with no consumer group, so a crashed worker's
job waits for its own timeout; taskiq's Redis stream broker acknowledges outside the result backend. Streams
give what is needed directly: consumer groups (XREADGROUP), the pending entries of a worker that died, claimed
by another after `claim_idle_s` (XAUTOCLAIM), and persistence with the rest of the gateway's state.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class JobsConfig:
    workers: int = 2                      # items one gateway runs at once (0: this gateway runs none)
    max_attempts: int = 5                 # runs of one item before its result is a failure and a dead letter
    backoff_base_s: float = 2.0           # a transient failure waits base * 2^(attempt-1), jittered, before a retry
    backoff_max_s: float = 300.0
    claim_idle_s: float = 60.0            # an item held this long by a worker that stopped renewing it is taken over
    item_timeout_s: float = 600.0         # one item's deadline in the pipeline
    poll_s: float = 0.2                   # an idle worker looks for work this often
    retention_s: float = 7 * 86_400       # a job's items and results are kept this long after it ends
    max_items: int = 50_000               # requests in one job (OpenAI's bound)
    max_file_bytes: int = 100 << 20       # an uploaded JSONL file
    default_window_s: int = 86_400        # completion window
    webhook_attempts: int = 6             # deliveries of one webhook before it is given up (recorded)
    webhook_timeout_s: float = 10.0
    webhook_backoff_s: float = 2.0        # doubles each attempt (jittered), up to backoff_max_s
    webhook_private: bool = False         # send webhooks to private, loopback and link-local addresses too (off: a
                                          # tenant's URL must not reach into the gateway's own network)
