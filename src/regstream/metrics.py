"""Prometheus metrics, one registry-wide set for the process.

Names follow the Prometheus conventions (``_total`` counters, ``_seconds`` histograms). Labels are
low-cardinality (stage, outcome, code); never a registration id or any personal data.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# --- stream side -------------------------------------------------------------------------------
STREAMS_CONNECTED = Gauge("regstream_sse_streams_connected", "Open SSE streams in this process")
STREAM_WRITE_PATH = Gauge(
    "regstream_sse_stream_write_path",
    "1 for the path that writes this process's streams: transport (taken over from uvicorn's "
    "httptools protocol, api/takeover.py) or queued (the portable ASGI send)",
    ["path"],
)
REDIS_MESSAGES_RECEIVED = Counter(
    "regstream_redis_messages_received_total", "Messages received from the Redis subscription"
)
FRAMES_DELIVERED = Counter(
    "regstream_sse_frames_delivered_total", "Update frames written to streams"
)
FRAMES_DROPPED = Counter(
    "regstream_sse_frames_dropped_total", "Update frames not written (stream closing or cut off)"
)
SLOW_CLIENTS_CUT = Counter(
    "regstream_sse_slow_clients_cut_total", "Streams closed because the client stopped reading"
)
STREAM_STARTS = Counter(
    "regstream_sse_stream_starts_total",
    "Stream start-ups by how they began: live (fresh), replay (a complete resume), snapshot",
    ["start"],
)
STREAM_STARTS_DEFERRED = Counter(
    "regstream_sse_stream_starts_deferred_total",
    "Stream start-ups answered with a retry hint instead (resume herd admission)",
    ["reason"],
)
DELIVERY_LATENCY = Histogram(
    "regstream_delivery_latency_seconds",
    "Publish timestamp to frame written, per message",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
BROWSER_LATENCY = Histogram(
    "regstream_browser_latency_seconds",
    "Publish timestamp to browser receipt, as reported by browsers",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
REDIS_RECONNECTS = Counter(
    "regstream_redis_reconnects_total", "Redis reconnections", ["connection"]
)
REDIS_SUBSCRIPTION_HEALTHY = Gauge(
    "regstream_redis_subscription_healthy", "1 when the self-probe came back through Pub/Sub"
)
BUS_PARTITIONS_SUBSCRIBED = Gauge(
    "regstream_bus_partitions_subscribed",
    "partitions of the bus this instance subscribes to (Redis Cluster: those its streams follow)",
)
PUBLISH_FAILURES = Counter(
    "regstream_publish_failures_total",
    "Publish round trips that failed (their updates stay queued)",
)
OUTBOX_SIZE = Gauge(
    "regstream_publish_outbox_size",
    "Updates queued for Redis (the next batch, or while it is down)",
)
OUTBOX_OVERFLOWS = Counter(
    "regstream_publish_outbox_overflows_total", "Updates dropped from a full outbox"
)
PUBLISH_DUPLICATES_SKIPPED = Counter(
    "regstream_publish_duplicates_skipped_total",
    "Updates the publish script skipped: their (registrationId, seq) was published already "
    "(a retried batch, or republished by the start-up catch-up)",
)
CATCH_UP_REPUBLISHED = Counter(
    "regstream_catch_up_republished_total",
    "Committed updates Redis had not seen, republished from the process log by the catch-up",
)
REDIS_EPOCHS_BEGUN = Counter(
    "regstream_redis_epochs_begun_total",
    "New history epochs this process began because Redis was another primary (a failover)",
)
PUBLISH_HOLDS = Counter(
    "regstream_publish_holds_total",
    "Validation runs that waited to start because the outbox was half full (Redis slower than "
    "the pipeline)",
)

# --- shutdown (drain.py) ------------------------------------------------------------------------
SHUTDOWN_PHASE = Gauge(
    "regstream_shutdown_phase",
    "0 serving, 1 draining (readiness off, still serving), 2 closing streams, "
    "3 finishing validations",
)
SHUTDOWN_STREAMS_CLOSED = Counter(
    "regstream_shutdown_streams_closed_total",
    "Streams closed by a graceful shutdown, each with a jittered retry hint",
)

# --- pipeline side -----------------------------------------------------------------------------
STAGE_DURATION = Histogram(
    "regstream_stage_duration_seconds", "Pipeline stage duration", ["stage", "result"]
)
OUTCOMES = Counter("regstream_validation_outcomes_total", "Validation outcomes", ["status", "code"])
RUNS_IN_PROGRESS = Gauge("regstream_validations_in_progress", "Validation runs in progress")
RUNS_TAKEN = Counter(
    "regstream_runs_taken_total",
    "Runs this instance took: direct (a click with a free slot), queued (from the shared work "
    "queue), taken_over (held by an instance that stopped beating or whose lease expired)",
    ["how"],
)
RUNS_RELEASED = Counter(
    "regstream_runs_released_total",
    "Runs this instance gave back to the shared work queue at shutdown",
)

# --- core banking (T24) ------------------------------------------------------------------------
T24_CALL_LATENCY = Histogram(
    "regstream_t24_call_seconds", "T24 HTTP call latency", ["operation", "outcome"]
)
T24_ERRORS = Counter("regstream_t24_errors_total", "T24 call errors", ["operation", "code"])
T24_BREAKER_OPEN = Gauge("regstream_t24_breaker_open", "1 while the T24 circuit breaker is open")

# --- limits (auth/limits.py) -------------------------------------------------------------------
LIMITS_SHARED = Gauge(
    "regstream_limits_shared", "1 while rate limits and stream slots count fleet-wide in Redis"
)
LIMIT_FALLBACKS = Counter(
    "regstream_limit_fallbacks_total",
    "Limit decisions taken per process because Redis did not answer",
)
LOGIN_THROTTLED = Counter(
    "regstream_login_throttled_total", "Sign-ins refused with 429, by limit", ["limit"]
)
