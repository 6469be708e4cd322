"""The server's metrics in Prometheus text format: request latency and counts, batch sizes and times."""

from __future__ import annotations

import threading


def _labels(names: tuple, values: tuple) -> str:
    return ",".join(f'{n}="{v}"' for n, v in zip(names, values, strict=True))


class _Histogram:
    """A Prometheus histogram with fixed buckets and optional labels (thread-safe)."""

    def __init__(self, name: str, help_: str, buckets: tuple, label_names: tuple = ()):
        self.name, self.help, self.buckets, self.label_names = name, help_, buckets, label_names
        self._series: dict[tuple, list] = {}
        self._lock = threading.Lock()

    def observe(self, value: float, labels: tuple = ()) -> None:
        with self._lock:
            s = self._series.setdefault(labels, [[0] * len(self.buckets), 0.0, 0])
            for i, b in enumerate(self.buckets):
                if value <= b:
                    s[0][i] += 1
            s[1] += value
            s[2] += 1

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            for labels, (counts, total, n) in sorted(self._series.items()):
                lab = _labels(self.label_names, labels)
                sep = "," if lab else ""
                for b, c in zip(self.buckets, counts, strict=True):
                    out.append(f'{self.name}_bucket{{{lab}{sep}le="{b:g}"}} {c}')
                out.append(f'{self.name}_bucket{{{lab}{sep}le="+Inf"}} {n}')
                out.append(f"{self.name}_sum{{{lab}}} {total:.6g}" if lab else f"{self.name}_sum {total:.6g}")
                out.append(f"{self.name}_count{{{lab}}} {n}" if lab else f"{self.name}_count {n}")
        return out


class Metrics:
    """The server's counters and histograms, rendered in Prometheus text format (version 0.0.4)."""

    def __init__(self):
        pow2 = tuple(2**i for i in range(11))
        self.request_seconds = _Histogram(
            "embfast_request_duration_seconds", "HTTP request latency in seconds, by endpoint",
            (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), ("endpoint",))
        self.batch_texts = _Histogram("embfast_batch_texts", "texts per ONNX Runtime batch", pow2)
        self.batch_requests = _Histogram("embfast_batch_requests", "requests merged into one batch", pow2)
        self.batch_tokens = _Histogram("embfast_batch_tokens", "padded tokens per batch (rows x longest row)",
                                       tuple(2**i for i in range(4, 17)))
        self.batch_seconds = _Histogram("embfast_batch_duration_seconds", "pad + ONNX Runtime + pooling time",
                                        (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self._counters: dict[tuple, float] = {}
        self._lock = threading.Lock()

    def inc(self, name: str, labels: tuple = (), value: float = 1) -> None:
        with self._lock:
            self._counters[(name, labels)] = self._counters.get((name, labels), 0) + value

    def on_batch(self, s) -> None:
        """Batch listener (runs on the batcher's worker thread)."""
        self.batch_texts.observe(s.texts)
        self.batch_requests.observe(s.requests)
        self.batch_tokens.observe(s.padded_tokens)
        self.batch_seconds.observe(s.seconds)
        self.inc("embfast_batch_real_tokens_total", value=s.tokens)
        self.inc("embfast_batch_padded_tokens_total", value=s.padded_tokens)

    _COUNTER_META = {
        "embfast_requests_total": ("HTTP requests by endpoint and status code", ("endpoint", "code")),
        "embfast_errors_total": ("refused or failed requests by kind", ("kind",)),
        "embfast_texts_total": ("texts embedded", ()),
        "embfast_tokens_total": ("tokens fed to the model for embedded texts", ()),
        "embfast_truncated_texts_total": ("texts cut at max_seq_length", ()),
        "embfast_batch_real_tokens_total": ("real tokens run (no padding)", ()),
        "embfast_batch_padded_tokens_total": ("tokens run, padding included", ()),
    }

    def render(self, batcher_stats: dict | None) -> str:
        lines: list[str] = []
        st = batcher_stats or {}
        for name, key, help_ in (("embfast_queue_texts", "queued_texts", "texts waiting for a batch"),
                                 ("embfast_queue_tokens", "queued_tokens", "tokens of the texts waiting"),
                                 ("embfast_queue_requests", "queued_requests", "requests with texts waiting"),
                                 ("embfast_inflight_requests", "in_flight_requests",
                                  "requests admitted and not finished")):
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {st.get(key, 0)}"]
        lines += ["# HELP embfast_rejected_total requests refused because the queue was full",
                  "# TYPE embfast_rejected_total counter", f"embfast_rejected_total {st.get('rejected', 0)}"]
        with self._lock:
            counters = dict(self._counters)
        for name, (help_, label_names) in self._COUNTER_META.items():
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} counter"]
            series = {lab: v for (n, lab), v in counters.items() if n == name}
            if not series and not label_names:
                series = {(): 0}
            for lab, v in sorted(series.items()):
                lines.append(f"{name}{{{_labels(label_names, lab)}}} {v:g}" if label_names else f"{name} {v:g}")
        for h in (self.request_seconds, self.batch_texts, self.batch_requests, self.batch_tokens,
                  self.batch_seconds):
            lines += h.render()
        return "\n".join(lines) + "\n"
