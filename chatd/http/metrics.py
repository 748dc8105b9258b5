"""Prometheus metrics: the engine's own counters, read when /metrics is scraped.

The engine counts with plain integers and :class:`chatd.histogram.Histogram`
on its hot paths; :class:`EngineCollector` turns them into Prometheus
families at scrape time, so a send pays no metrics library call. Each server
has its own registry (no global one): two servers in one process, as in the
tests, never mix their numbers. The process collector adds CPU, memory and
file descriptors, the GC collector Python's collections.

Names follow the Prometheus conventions: a ``chatd_`` prefix, base units
(seconds), ``_total`` on counters, labels for bounded sets only (op names,
error codes, reply statuses, components), never a user or conversation.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, GCCollector, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from chatd.histogram import Histogram

if TYPE_CHECKING:
    from chatd.server import Server

try:
    _VERSION = version("chatd")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    _VERSION = "unknown"

#: The exposition format's content type.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    buckets = [("+Inf" if b == float("inf") else repr(float(b)), n) for b, n in h.cumulative()]
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h.sum)


class EngineCollector:
    """Reads a running server's counters at scrape time."""

    def __init__(self, server: Server) -> None:
        self._server = server

    def collect(self) -> Iterator[Metric]:
        server = self._server
        e = server.engine
        sc, hub, relay, runner = e.counters, e.hub, e.relay, e.replies.runner
        ready = server.readiness

        info = GaugeMetricFamily(
            "chatd_build_info",
            "chatd's version and Python's, always 1",
            labels=["version", "python"],
        )
        info.add_metric([_VERSION, platform.python_version()], 1)
        yield info
        yield _gauge("chatd_connections", "WebSocket clients connected", len(e.sessions))
        yield _gauge("chatd_http_connections", "Plain HTTP connections open", server.http.open)
        yield _counter(
            "chatd_http_connections_refused",
            "HTTP connections refused at [http].max_connections",
            server.http.refused,
        )
        yield _gauge(
            "chatd_feeds", "Conversations with subscribers in this process", len(hub.feeds)
        )
        ops = CounterMetricFamily(
            "chatd_ops",
            "Client ops by op and result: ok, or the error code answered "
            "(a send's result is its answer: ok, duplicate, unavailable, internal)",
            labels=["op", "result"],
        )
        for (op, result), n in sorted(sc.ops.items()):
            ops.add_metric([op, result], n)
        yield ops
        yield _histogram(
            "chatd_send_ack_seconds", "Seconds from a send's arrival to its answer", sc.ack_seconds
        )
        yield _histogram(
            "chatd_commit_batch_size", "Messages per commit transaction", e.committer.batch_sizes
        )
        yield _counter("chatd_messages_committed", "Messages committed", e.committer.committed)
        yield _counter(
            "chatd_commit_isolated",
            "Messages the log refused, isolated from their batch",
            e.committer.isolated,
        )

        outbox = ready.outbox
        yield _gauge(
            "chatd_outbox_rows",
            "Outbox rows not yet published (last probe)",
            outbox.get("outbox_rows", 0),
        )
        yield _gauge(
            "chatd_outbox_oldest_age_seconds",
            "Age of the oldest outbox row (last probe)",
            outbox.get("outbox_oldest_s", 0.0),
        )
        yield _counter(
            "chatd_relay_published_fresh",
            "Messages published by their own process right after the commit",
            relay.fresh_published,
        )
        yield _counter(
            "chatd_relay_swept",
            "Messages published by the relay's sweep (their process could not)",
            relay.published,
        )
        yield _counter(
            "chatd_relay_publish_failures", "Publishes to Redis that failed", relay.publish_failures
        )
        yield _counter(
            "chatd_relay_publish_overflows",
            "Commits whose publish queue was full (the sweep published them)",
            e.committer.publish_overflows,
        )

        yield _gauge(
            "chatd_pubsub_up", "1 while the pub/sub connection is live", int(hub.bus_healthy)
        )
        yield _counter("chatd_pubsub_connects", "Pub/sub (re)connections", hub.pubsub_connects)
        yield _counter(
            "chatd_gap_fills", "Gaps in a feed filled from Postgres", hub.counters.gap_fills
        )
        yield _counter(
            "chatd_stream_fills",
            "Reply deltas lost on the way, filled from the partial",
            hub.counters.stream_fills,
        )
        yield _counter("chatd_resyncs", "Feeds resynchronised from Postgres", hub.counters.resyncs)
        yield _gauge(
            "chatd_joins_queued", "Subscribes waiting for their snapshot", hub.loader.queued
        )

        yield _gauge(
            "chatd_replies_running", "Replies generating in this process", len(e.replies.active)
        )
        ends = CounterMetricFamily(
            "chatd_reply_ends", "Replies ended, by status", labels=["status"]
        )
        for status, n in (
            ("completed", runner.completed),
            ("interrupted", runner.interrupted),
            ("failed", runner.failed),
        ):
            ends.add_metric([status], n)
        yield ends
        yield _counter(
            "chatd_replies_taken_over",
            "Replies of a dead process taken over and ended by this one",
            runner.takeovers,
        )
        yield _counter(
            "chatd_token_deliveries",
            "Reply delta frames handed to clients (one per viewer per delta)",
            hub.counters.deltas_delivered,
        )
        yield _counter(
            "chatd_lane_failures", "Lane batches Redis did not take", e.replies.lane.failures
        )

        drops = CounterMetricFamily(
            "chatd_disconnects",
            "Clients closed by the server, by reason",
            labels=["reason"],
        )
        for reason, n in (
            ("slow_consumer", sc.slow_disconnects),
            ("hello_timeout", sc.hello_timeouts),
            ("no_pong", sc.dead_peers),
            ("token_expired", sc.expired_tokens),
            ("session_crashed", sc.crashed),
        ):
            drops.add_metric([reason], n)
        yield drops
        refusals = CounterMetricFamily(
            "chatd_refusals",
            "Requests refused, by error code (auth failures: unauthorized, forbidden; "
            "limits: rate_limited, too_many_...)",
            labels=["code"],
        )
        for code, n in sorted(e.refusals.counts.items()):
            refusals.add_metric([code], n)
        yield refusals
        handshakes = CounterMetricFamily(
            "chatd_handshakes_refused", "WebSocket handshakes refused, by reason", labels=["reason"]
        )
        for reason, n in sorted(e.gate.refused.items()):
            handshakes.add_metric([reason], n)
        yield handshakes
        yield _counter(
            "chatd_reads_throttled", "Times a client over its frame budget was paused", sc.throttled
        )

        gates = GaugeMetricFamily(
            "chatd_chaos_gate_open",
            "1 while the break switch holds a component broken",
            labels=["component"],
        )
        for component, state in e.chaos.status().items():
            gates.add_metric([component], int(state["broken"]))
        yield gates
        watch = server.embedded
        if watch is not None:
            up = GaugeMetricFamily(
                "chatd_embedded_up", "1 while an embedded server runs", labels=["server"]
            )
            restarts = CounterMetricFamily(
                "chatd_embedded_restarts",
                "Embedded servers restarted after dying",
                labels=["server"],
            )
            for name in watch.servers:
                up.add_metric([name], int(name not in watch.down))
                restarts.add_metric([name], watch.restarts[name])
            yield up
            yield restarts
        streams = e.streams
        if streams is not None:
            yield _counter(
                "chatd_durable_appends", "Durable Streams appends answered", streams.appends
            )
            yield _counter(
                "chatd_durable_append_batches",
                "Group commits of Durable Streams appends",
                streams.batches,
            )
            yield _gauge(
                "chatd_durable_live_readers",
                "Long-poll and SSE readers waiting on Durable Streams",
                streams.live_readers,
            )
            wakes = CounterMetricFamily(
                "chatd_durable_wakes",
                "Durable stream changes published to other processes, received, or dropped",
                labels=["kind"],
            )
            wakes.add_metric(["sent"], streams.wakes_sent)
            wakes.add_metric(["received"], streams.wakes_received)
            wakes.add_metric(["dropped"], streams.wakes_dropped)
            yield wakes
        yield _gauge("chatd_ready", "1 while /readyz answers 200", int(ready.ready))
        yield _gauge("chatd_draining", "1 once a shutdown began", int(ready.draining))
        yield _gauge(
            "chatd_event_loop_lag_seconds",
            "Largest lateness of a timer over the last probe interval",
            ready.loop_lag,
        )


def registry_for(server: Server) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(server))  # type: ignore[arg-type]
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
