"""The server's metrics through ``prometheus_client``: request latency and counts, batch sizes and times, the
batcher's queue. Each app has a registry of its own (``Metrics().registry``), so two apps in one process (tests,
several servers) never share or collide.

Names (documented in the README; TEI's ``te_*`` metrics were the guide):
- ``embfast_request_duration_seconds{endpoint}`` histogram; ``embfast_requests_total{endpoint, code}``;
  ``embfast_errors_total{kind}`` (refused or failed requests by error code).
- ``embfast_texts_total``, ``embfast_tokens_total``, ``embfast_truncated_texts_total``: what was embedded.
- ``embfast_batch_texts``, ``embfast_batch_requests``, ``embfast_batch_tokens`` (padded), and
  ``embfast_batch_duration_seconds`` histograms; ``embfast_batch_real_tokens_total`` /
  ``embfast_batch_padded_tokens_total`` counters (their ratio is the padding overhead).
- Gauges read from the batcher at scrape time: ``embfast_queue_texts``, ``embfast_queue_tokens``,
  ``embfast_queue_requests``, ``embfast_inflight_requests``, ``embfast_inflight_texts``, ``embfast_inflight_tokens``,
  ``embfast_running_batches`` (summed over the served models);
  ``embfast_rejected_total`` (429s) and ``embfast_cancelled_total`` (requests whose client went away, or
  that timed out, before all their texts ran: their texts left the queue; such requests count as code 499).
"""

from __future__ import annotations

import threading

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_QUEUE_GAUGES = (("embfast_queue_texts", "queued_texts", "texts waiting for a batch"),
                 ("embfast_queue_tokens", "queued_tokens", "tokens of the texts waiting"),
                 ("embfast_queue_requests", "queued_requests", "requests with texts waiting"),
                 ("embfast_inflight_requests", "in_flight_requests", "requests admitted and not finished"),
                 ("embfast_inflight_texts", "in_flight_texts", "texts admitted and not finished (max_queue_texts)"),
                 ("embfast_inflight_tokens", "in_flight_tokens", "tokens admitted and not finished (max_queue_tokens)"),
                 ("embfast_running_batches", "running_batches", "batches being computed now (also for clients that "
                  "have gone)"))


class _BatcherCollector:
    """Gauges of the batcher's queue, read when scraped (the stats dict the last render was given)."""

    def __init__(self):
        self.stats: dict = {}

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        st = self.stats
        for name, key, help_ in _QUEUE_GAUGES:
            yield GaugeMetricFamily(name, help_, value=st.get(key, 0))
        yield CounterMetricFamily("embfast_rejected", "requests refused because the queue was full",
                                  value=st.get("rejected", 0))
        yield CounterMetricFamily("embfast_cancelled", "requests dropped from the queue before all their texts "
                                  "ran (the client went away, or a timeout)", value=st.get("cancelled", 0))


class Metrics:
    """The server's counters and histograms in a registry of their own, rendered in Prometheus text format."""

    def __init__(self):
        try:
            from prometheus_client import CollectorRegistry, Counter, Histogram
        except ImportError as exc:
            raise ImportError(f"embfast serve needs the server extra: pip install 'embfast[server]' ({exc})") from exc
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        pow2 = tuple(float(2**i) for i in range(11))
        self.request_seconds = Histogram("embfast_request_duration_seconds", "HTTP request latency in seconds, "
                                         "by endpoint", ["endpoint"], buckets=_LATENCY_BUCKETS, registry=reg)
        self.batch_texts = Histogram("embfast_batch_texts", "texts per ONNX Runtime batch", buckets=pow2, registry=reg)
        self.batch_requests = Histogram("embfast_batch_requests", "requests merged into one batch", buckets=pow2,
                                        registry=reg)
        self.batch_tokens = Histogram("embfast_batch_tokens", "padded tokens per batch (rows x longest row)",
                                      buckets=tuple(float(2**i) for i in range(4, 17)), registry=reg)
        self.batch_seconds = Histogram("embfast_batch_duration_seconds", "pad + ONNX Runtime + pooling time",
                                       buckets=_LATENCY_BUCKETS[:11], registry=reg)
        self.queue_wait = Histogram("embfast_queue_wait_seconds", "how long each batch's oldest text waited in "
                                    "the queue", buckets=_LATENCY_BUCKETS, registry=reg)
        self.plan_seconds = Counter("embfast_batch_planning_seconds", "worker time spent choosing batches "
                                    "(queue lock held)", registry=reg)
        self._counters = {
            "embfast_requests_total": Counter("embfast_requests", "HTTP requests by endpoint and status code",
                                              ["endpoint", "code"], registry=reg),
            "embfast_errors_total": Counter("embfast_errors", "refused or failed requests by kind", ["kind"],
                                            registry=reg),
            "embfast_texts_total": Counter("embfast_texts", "texts embedded", registry=reg),
            "embfast_tokens_total": Counter("embfast_tokens", "tokens fed to the model for embedded texts",
                                            registry=reg),
            "embfast_truncated_texts_total": Counter("embfast_truncated_texts", "texts cut at max_seq_length",
                                                     registry=reg),
            "embfast_batch_real_tokens_total": Counter("embfast_batch_real_tokens", "real tokens run (no padding)",
                                                       registry=reg),
            "embfast_batch_padded_tokens_total": Counter("embfast_batch_padded_tokens", "tokens run, padding "
                                                         "included", registry=reg),
        }
        self._batcher = _BatcherCollector()
        reg.register(self._batcher)
        self._render_lock = threading.Lock()
        self._children: dict = {}  # (name, labels) -> the labelled child: .labels() costs a lock and a lookup

    def _child(self, name: str, labels: tuple):
        key = (name, labels)
        child = self._children.get(key)
        if child is None:
            metric = self.request_seconds if name is None else self._counters[name]
            child = self._children[key] = metric.labels(*labels) if labels else metric
        return child

    def inc(self, name: str, labels: tuple = (), value: float = 1) -> None:
        """Add ``value`` to the counter ``name`` (its exposed name, ``..._total``) with label values ``labels``."""
        self._child(name, labels).inc(value)

    def observe_request(self, endpoint: str, seconds: float) -> None:
        self._child(None, (endpoint,)).observe(seconds)

    def on_batch(self, s) -> None:
        """Batch listener (runs on the batcher's worker thread)."""
        self.batch_texts.observe(s.texts)
        self.batch_requests.observe(s.requests)
        self.batch_tokens.observe(s.padded_tokens)
        self.batch_seconds.observe(s.seconds)
        self.queue_wait.observe(s.wait_seconds)
        self.plan_seconds.inc(s.plan_seconds)
        self.inc("embfast_batch_real_tokens_total", value=s.tokens)
        self.inc("embfast_batch_padded_tokens_total", value=s.padded_tokens)

    def render(self, batcher_stats: dict | None) -> str:
        """Prometheus text format (0.0.4) of every metric, with the queue gauges from ``batcher_stats``."""
        from prometheus_client import generate_latest

        with self._render_lock:
            self._batcher.stats = batcher_stats or {}
            return generate_latest(self.registry).decode()
