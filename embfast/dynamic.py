"""Dynamic batching: many concurrent callers (threads or asyncio), one ONNX Runtime worker.

Three stages, as TEI splits them (transport -> inference queue -> backend):

1. **Admission and tokenization, in the caller.** ``encode`` tokenizes in the
   calling thread; ``encode_async`` tokenizes small inputs on the event loop
   and large ones on a small tokenizer thread pool, so the loop never stalls.
   A full queue is refused at once with :class:`OverloadedError` (HTTP 429,
   with a retry-after estimated from the backlog and the measured throughput).
   The queue is counted three ways: requests (``max_queue``, checked before
   any work is spent), texts (``max_queue_texts``) and tokens
   (``max_queue_tokens``, checked once the request is tokenized), so a few
   requests of thousands of long texts cannot fill it for everyone: a request
   over 1/16 of a budget may fill the queue only to 3/4 of it (unless the queue
   is empty), the last quarter is kept for small requests. A request larger
   than a whole budget is refused with :class:`RequestTooLargeError` (HTTP 413:
   it could never fit, retrying does not help). An over-long text with ``truncate=False`` fails
   its own caller with :class:`~embfast.InputTooLongError` and nobody else.
2. **Batch assembly, in the worker thread.** Pending texts from all callers are
   merged by a token budget that counts padding (rows x longest row), as the
   offline :func:`~embfast.batching.plan_batches`: the worker plans the oldest
   pending texts (at most ``max(max_batch_size, 256)``) into
   length-sorted batches that minimize padded tokens plus a fixed cost per
   ONNX Runtime call (:func:`plan_by_cost`), and runs the one holding the
   *oldest* text, so similar lengths go together and no text waits behind an
   endless stream of newer ones. When the
   worker is idle and arriving requests have lately found others in flight,
   it waits up to ``max_wait_ms`` after the oldest arrival for
   more texts, unless a full batch (``max_batch_size`` texts or
   ``max_batch_tokens`` tokens) is already pending.
3. **Inference, in the worker thread**: pad, ONNX Runtime, pool
   (:meth:`Embedder.embed_token_ids`). ORT releases the GIL, so callers keep
   tokenizing the next batch while it runs. Truncation to ``truncate_dim``,
   normalization and output quantization then run in each caller's own
   thread (:meth:`Embedder.postprocess`), in encode's documented order.

Model kinds: the worker knows a model only through one small protocol:
``tokenizer`` (``tokenize`` -> :class:`~embfast.tokenization.Tokenized`),
``embed_token_ids(ids, rows, ...)`` -> (len(rows), ``config.dim``) float32 rows,
and ``postprocess``. An :class:`~embfast.Embedder` returns pooled vectors
(``encode`` / ``encode_async``); a :class:`~embfast.CrossEncoder` returns logits
(``predict`` / ``predict_async``: pairs are tokenized in the caller with their
segment ids, the activation runs in the caller's thread); a :class:`~embfast.SparseEncoder`
returns (n, vocab) SPLADE weights (``encode_sparse`` / ``encode_sparse_async``: made CSR in the
caller's thread). Queueing, budgets, cancellation and failure isolation are the same for all.

Threads: one worker runs ORT with the embedder's intra-op threads (default: all
cores); tokenizer threads are few (``min(4, cores // 2)``, at least 1) and only
used by ``encode_async`` for large inputs. In a server process also set
``TOKENIZERS_PARALLELISM=false`` (``embfast serve`` does), so the tokenizers'
own thread pool does not compete with ORT for the cores.

Every caller gets exactly its own rows, in input order. A caller that is
cancelled (asyncio) or times out (``timeout=``) is dropped: its texts that were
not yet batched are never run and its finished rows are discarded; nobody else
notices. If ONNX Runtime fails on a batch that merges several callers, each
caller's rows are retried alone, so one bad input fails only its own caller.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import concurrent.futures
import copy
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from embfast.dynamic_sparse import SparseCalls
from embfast.encoder import EncodeInfo, as_text_list
from embfast.quantization import OUTPUT_PRECISIONS
from embfast.tokenization import InputTooLongError, Tokenized

log = logging.getLogger(__name__)

__all__ = ["BatchStats", "BatcherClosedError", "DynamicBatcher", "OverloadedError", "RequestTooLargeError",
           "RunLock", "plan_by_cost"]

#: default ``max_queue_texts``: 16 requests of 2,048 texts (OpenAI's and the server's most per request)
DEFAULT_MAX_QUEUE_TEXTS = 32768
#: default ``max_queue_tokens`` = this many requests of 2,048 texts of ``max_seq_length`` tokens each
DEFAULT_QUEUE_TOKEN_REQUESTS = 4
#: a request over this share of a budget is "large": it may fill the queue only to LARGE_FILL of that budget
SMALL_SHARE = 1 / 16
LARGE_FILL = 3 / 4
#: retry-after estimates are clamped to [1, RETRY_AFTER_MAX_S] seconds
RETRY_AFTER_MAX_S = 60


class OverloadedError(RuntimeError):
    """The batcher's queue is full (``max_queue`` requests, ``max_queue_texts`` texts or ``max_queue_tokens``
    tokens waiting or running); retry later. HTTP: 429 with ``retry-after``.

    Attributes:
        retry_after_s: whole seconds (>= 1) after which the backlog that blocks this request should have
            drained, estimated from the queue and the recent throughput (1 while nothing has been measured).
    """

    def __init__(self, message: str = "the queue is full; retry later", retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = max(1, int(retry_after_s))


class RequestTooLargeError(OverloadedError):
    """One request alone holds more texts or tokens than the whole queue may (``max_queue_texts`` /
    ``max_queue_tokens``): it can never be admitted; split it or raise the limit. HTTP: 413."""


class BatcherClosedError(RuntimeError):
    """The batcher was closed: it takes no new requests. HTTP: 503."""


@dataclass(frozen=True)
class BatchStats:
    """What one ONNX Runtime call of the worker did; passed to batch listeners.

    Attributes:
        texts: rows in the batch.
        requests: distinct callers whose texts are in the batch.
        tokens: real tokens (sum of the rows' lengths, special tokens included).
        padded_tokens: tokens fed to the model, padding included (rows x longest row).
        seconds: wall time of pad + ONNX Runtime + pooling (a failed batch's retries included).
        queued_texts: texts still waiting when the batch started.
        failed_requests: callers of this batch that got an error.
        wait_seconds: how long the batch's oldest row waited in the queue (from its request's arrival to this
            batch's start), in seconds.
        plan_seconds: time the worker spent choosing this batch (planning, with the queue's lock held).
        threads: ONNX Runtime intra-op threads the call ran on (with ``workers`` > 1: the twin's share when
            other calls ran or waited, else all of the model's); 0 when unknown (a GPU session).
    """

    texts: int
    requests: int
    tokens: int
    padded_tokens: int
    seconds: float
    queued_texts: int
    failed_requests: int
    wait_seconds: float = 0.0
    plan_seconds: float = 0.0
    threads: int = 0


class CallCostEstimator:
    """Online fit of a batch's cost, ``seconds = a + b x padded_tokens``, by least squares with exponential
    forgetting (each new batch weighs 1, older ones ``decay`` times less per batch), for ``call_cost_tokens="auto"``:
    the fixed cost of one call, in padded tokens, is ``a / b``. What one call costs depends on the machine and on
    what shares it (an event loop and HTTP clients on the same cores add to every call), so it is measured
    where it runs rather than assumed.

    Args:
        floor / ceiling: bounds of the estimate, in padded tokens. decay: in (0, 1), default 0.98 (about the
            last 50 batches count).
    """

    def __init__(self, floor: float, ceiling: float, decay: float = 0.98):
        self.floor, self.ceiling, self.decay = float(floor), float(ceiling), float(decay)
        self._sums = np.zeros(5)  # weight, x, y, x^2, xy

    def add(self, padded_tokens: float, seconds: float) -> None:
        x, y = float(padded_tokens), float(seconds)
        self._sums = self._sums * self.decay + np.array([1.0, x, y, x * x, x * y])

    def tokens(self) -> float | None:
        """The fitted fixed cost per call in padded tokens, within [floor, ceiling]; None until the batches seen
        vary enough in size to tell the fixed cost from the per-token one."""
        w, sx, sy, sxx, sxy = self._sums
        if w < 8:
            return None
        var = w * sxx - sx * sx
        if var <= 1e-6 * w * sxx:  # (almost) all batches the same size: no slope to fit
            return None
        b = (w * sxy - sx * sy) / var
        a = (sy - b * sx) / w
        if b <= 0:
            return None
        return min(max(a / b, self.floor), self.ceiling)


def name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` (at most 15 bytes) in the OS too (Linux ``prctl(PR_SET_NAME)``), so
    ``top -H``, py-spy and ``/proc/PID/task/*/comm`` tell embfast's threads from ONNX Runtime's; a no-op
    elsewhere or when it fails."""
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(15, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


class RunLock:
    """First-come, first-served slots for ONNX Runtime calls: at most ``slots`` calls run at once.

    Shared by the batchers of several models in one server, it keeps the models' thread pools from
    oversubscribing the cores (default 1 slot: one model runs at a time, with all its threads), and no worker
    can take a slot again while another waits (a plain ``threading.Lock`` lets the thread that releases it take
    it again at once). A batcher with ``workers=N`` uses one of N slots per call on ``cores / N`` threads, or
    all N (:meth:`widen`) for a call that runs alone on all the cores.

    Use as a context manager (``with lock: ...``: one slot), or :meth:`acquire` / :meth:`widen` /
    :meth:`release`. ``waits`` counts acquisitions that had to wait.

    Args:
        slots: calls that may run at once, >= 1.
    """

    def __init__(self, slots: int = 1):
        self.slots = _check_int("slots", slots, 1)
        self._cond = threading.Condition(threading.Lock())
        self._queue: collections.deque[int] = collections.deque()  # waiting tickets, oldest first
        self._next = 0  # the ticket handed to the next caller that has to wait
        self._active = 0  # slots held now
        self.waits = 0
        self._users: list[weakref.ref] = []  # the batchers sharing this lock (see others_busy)

    def register(self, user) -> None:
        """Record a batcher sharing this lock, for :meth:`others_busy` (a weak reference)."""
        self._users.append(weakref.ref(user))

    def others_busy(self, me) -> bool:
        """True when a registered batcher other than ``me`` has work (its ``has_work()``)."""
        return any(user is not None and user is not me and user.has_work() for user in (r() for r in self._users))

    def acquire(self) -> None:
        """Take one slot, after every caller that was waiting before."""
        with self._cond:
            if self._active < self.slots and not self._queue:
                self._active += 1
                return
            ticket = self._next
            self._next += 1
            self._queue.append(ticket)
            self.waits += 1
            while self._queue[0] != ticket or self._active >= self.slots:
                self._cond.wait()
            self._queue.popleft()
            self._active += 1
            self._cond.notify_all()  # the next ticket may fit in another free slot

    def widen(self) -> bool:
        """Holding one slot, take all the others too when nobody else holds or waits for one; True if it did
        (release with ``release(wide=True)``)."""
        with self._cond:
            if self.slots == 1 or self._active != 1 or self._queue:
                return False
            self._active = self.slots
            return True

    def release(self, wide: bool = False) -> None:
        """Give back one slot, or all of them after a successful :meth:`widen`."""
        with self._cond:
            self._active -= self.slots if wide else 1
            self._cond.notify_all()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def narrow_twin(model, threads: int):
    """``model`` (an Embedder, CrossEncoder or SparseEncoder on the CPU) with a second ONNX Runtime session of
    ``threads`` intra-op threads over the same graph file; everything else (tokenizer, config, Dense layers) is
    shared. None where a twin makes no sense: a CUDA model, a model whose session already has at most
    ``threads`` threads, or one that pools inside the graph."""
    session = getattr(model, "session", None)
    if session is None or getattr(model, "device", "cpu") != "cpu" or session.threads <= threads \
            or getattr(model, "_pooled_runner", None) is not None or not hasattr(session, "with_threads"):
        return None
    twin = copy.copy(model)
    twin.session = session.with_threads(threads)
    return twin


QUEUE_POLICIES = ("deadline", "oldest")


def _urgency(req) -> tuple[float, int]:
    return req.deadline, req.seq


class _Request:
    """One caller's texts inside the batcher (worker-side state; guarded by the batcher's lock)."""

    __slots__ = ("future", "ids", "type_ids", "lengths", "pooled", "todo", "remaining", "t_enqueue", "deadline",
                 "seq", "prompt_length")

    def __init__(self, tok: Tokenized, hidden: int, prompt_length: int = 0):
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.prompt_length = prompt_length  # prompt tokens left out of pooling (include_prompt: false)
        self.ids = tok.ids
        self.type_ids = tok.type_ids  # segment ids of pairs (cross-encoders), or None
        self.lengths = np.asarray(tok.lengths, dtype=np.int64)
        n = len(tok.ids)
        self.pooled = np.empty((n, hidden), dtype=np.float32)
        self.todo = np.arange(n, dtype=np.int64)  # rows not yet given to a batch, ascending
        self.remaining = n  # rows not yet computed
        self.t_enqueue = time.monotonic()
        self.deadline = self.t_enqueue  # when it should be done; set by the batcher's policy at enqueue
        self.seq = 0  # arrival order, for ties


# Below this many DP steps (texts x candidate batch starts) the plain-Python DP is faster than NumPy's (one vector
# operation per text costs more than a few list lookups): 5.2 against 43.0 us for 8 texts, 48 against 161 us for
# 32 (the CPU look-ahead), 177 against 352 us for 64, about equal at 128 (2-core AMD EPYC; benchmarks/bench_plan.py).
_PLAN_PYTHON_STEPS = 64 * 64


def _plan_starts_numpy(width: np.ndarray, max_batch_size: int, max_batch_tokens: int,
                       call_cost_tokens: float) -> list[int]:
    """The DP of :func:`plan_by_cost` over ``width`` (padded width per length-sorted text, descending):
    ``start[i]``, where the last batch of the first i texts starts. One NumPy pass over the candidate starts per
    text; the reference for :func:`_plan_starts_python`."""
    n = width.size
    cost = np.zeros(n + 1)
    start = [0] * (n + 1)
    for i in range(1, n + 1):
        j0 = max(0, i - max_batch_size)
        rows = np.arange(i - j0, 0, -1)  # group sizes for starts j0 .. i-1
        padded = rows * width[j0:i]
        total = cost[j0:i] + call_cost_tokens + padded
        total[(padded > max_batch_tokens) & (rows > 1)] = np.inf
        k = int(np.argmin(total))  # ties: the earliest start, i.e. the larger batch
        cost[i], start[i] = total[k], j0 + k
    return start


def _plan_starts_python(width: np.ndarray, max_batch_size: int, max_batch_tokens: int,
                        call_cost_tokens: float) -> list[int]:
    """:func:`_plan_starts_numpy` in plain Python, for small inputs: the same float operations in the same order,
    and the same tie rule (the earliest start), so the same plan."""
    w = width.tolist()
    n = len(w)
    cost = [0.0] * (n + 1)
    start = [0] * (n + 1)
    for i in range(1, n + 1):
        best, arg = math.inf, 0
        for j in range(max(0, i - max_batch_size), i):
            padded = (i - j) * w[j]
            if padded > max_batch_tokens and i - j > 1:
                continue
            total = cost[j] + call_cost_tokens + padded
            if total < best:
                best, arg = total, j
        cost[i], start[i] = best, arg
    return start


def plan_by_cost(lengths: np.ndarray, max_batch_size: int, max_batch_tokens: int,
                 call_cost_tokens: float) -> list[np.ndarray]:
    """Split texts into length-sorted batches that minimize the estimated run time.

    Cost model: a batch costs ``call_cost_tokens + rows x longest row`` (ONNX
    Runtime's time on a CPU is close to linear in padded tokens, plus a fixed
    cost per call). An exact dynamic program over the length-sorted texts picks
    the contiguous groups with the least total cost, each within
    ``max_batch_size`` rows and ``max_batch_tokens`` padded tokens (a single
    longer text gets a batch of its own). A large ``call_cost_tokens`` gives few
    full batches (like :func:`~embfast.batching.plan_batches`); a small one
    splits mixed lengths to save padding.

    Args:
        lengths: (n,) tokens per text.
        max_batch_size: >= 1. max_batch_tokens: >= 1. call_cost_tokens: >= 0.

    Returns:
        Index arrays into ``lengths``, longest texts first; every index exactly once.
        O(n x max_batch_size) time.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    width = np.maximum(lengths[order], 1).astype(np.float64)  # width[j]: a group starting at j pads to it
    n = width.size
    small = n * min(n, max_batch_size) <= _PLAN_PYTHON_STEPS
    start = (_plan_starts_python if small else _plan_starts_numpy)(width, max_batch_size, max_batch_tokens,
                                                                   float(call_cost_tokens))
    groups = []
    i = n
    while i > 0:
        groups.append(order[start[i]:i])
        i = int(start[i])
    return groups[::-1]


def _check_token_ids(token_ids, vocab_size: int) -> list[list[int]]:
    """``token_ids`` as a list of non-empty lists of ints in [0, vocab_size); TypeError / ValueError otherwise."""
    if not isinstance(token_ids, (list, tuple)):
        raise TypeError(f"token_ids must be a list of lists of ints, got {type(token_ids).__name__}")
    out = []
    for i, row in enumerate(token_ids):
        if not isinstance(row, (list, tuple, np.ndarray)) or len(row) == 0:
            raise ValueError(f"token_ids[{i}] must be a non-empty list of ints")
        arr = np.asarray(row)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise TypeError(f"token_ids[{i}] must be a list of ints, got {arr.dtype} with shape {arr.shape}")
        bad = (arr < 0) | (arr >= vocab_size)
        if bad.any():
            raise ValueError(f"token_ids[{i}] holds {int(arr[bad][0])}: ids must be in [0, {vocab_size}) (this "
                             "model's vocabulary)")
        out.append([int(v) for v in arr])
    return out


def _default_tokenizer_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores // 2))


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class DynamicBatcher(SparseCalls):
    """Merge concurrent ``encode`` calls from threads and coroutines into token-budget batches.

    Args:
        embedder: the :class:`~embfast.Embedder` or :class:`~embfast.CrossEncoder` to run (shared; it
            stays usable directly). An Embedder's batcher serves ``encode``, a CrossEncoder's ``predict``.
        max_batch_tokens: at most this many padded tokens (rows x longest row) per
            ONNX Runtime call (default 16384, as ``Embedder.encode``). A single
            text longer than the budget still runs, alone.
        max_batch_size: at most this many texts per ONNX Runtime call (default 256).
        max_wait_ms: how long an idle worker waits after the oldest pending
            text arrived for more texts to merge, in milliseconds (default 2.0;
            0 = run at once). It waits only while arriving requests find
            others in flight (a moving average), so a lone sequential caller
            never pays it; under load it never waits either: texts that
            arrived while it ran are already older than this.
        max_queue: at most this many requests (calls) admitted and not finished,
            waiting or running (default 1024); one more raises
            :class:`OverloadedError` at once.
        max_queue_texts: at most this many texts (rows) admitted and not finished
            (default 32768 = 16 requests of 2,048 texts). max_queue_tokens: at most
            this many tokens (special tokens included, no padding) admitted and not
            finished (default None = 4 x 2048 x the model's max_seq_length: room for
            four requests of 2,048 texts of the longest length; 2,097,152 for
            all-MiniLM-L6-v2). Both are checked after tokenization: a request over
            1/16 of a budget is admitted only while the queue stays within 3/4 of
            that budget (or when the queue is empty), so a burst of large requests
            leaves room for small ones; over the limit, :class:`OverloadedError`
            (with ``retry_after_s``); a request larger than a whole budget,
            :class:`RequestTooLargeError`.
        merge_requests: False gives every ONNX Runtime call the texts of one
            request only (dynamic batching off, for comparison); queueing,
            backpressure and the worker thread stay the same.
        tokenizer_threads: threads that tokenize large ``encode_async`` inputs
            (default ``min(4, cores // 2)``, at least 1).
        call_cost_tokens: the fixed cost of one ONNX Runtime call, in padded
            tokens, for :func:`plan_by_cost`; pending texts of mixed lengths are
            split where saving padding beats an extra call. Default 32 on the CPU
            (all-MiniLM-L6-v2 on 2 cores: one call costs about as much as 20-40
            tokens), 2048 on CUDA (padding is nearly free on a GPU; a guess, not
            measured here). "auto": fitted online from the batches run so far
            (:class:`CallCostEstimator`), 32 until then.
        queue_policy: which pending texts the next batch serves. "deadline" (default): each request gets a
            deadline, its arrival plus its own estimated run time (its tokens, at least one text of
            max_seq_length, times the seconds per padded token measured on recent batches), and the batch holding
            the earliest deadline's next text runs first; a short request arriving behind a burst of long ones
            runs before them (as shortest-job-first), a long one is never starved (its deadline only comes
            closer), and requests of one text each (or of similar sizes) are served in arrival order, whatever
            their lengths. "oldest": arrival order (first in, first out), whatever the sizes.
        run_lock: a :class:`RunLock` shared with the batchers of other models in the same process (what
            ``embfast serve`` with several models does): each batch is planned and run holding it, so one model
            runs at a time with all its threads, and a batch waiting for the lock takes every text that arrived
            meanwhile. With ``workers`` > 1, a model's second and later workers run only while every other model
            on the lock is idle, or while this model has at least ``lookahead_texts`` texts queued: with two
            models busy under a light load, each runs one call at a time beside the other's, instead of splitting
            its few queued texts into smaller batches (benchmarks/README.md, "Two models in one server").
            Default None: this batcher's calls take no lock.
        lookahead_texts: how many pending texts, in order of urgency (whole requests: at least the most urgent
            one), the planner looks at when it forms the next batch (default 32 on the CPU, ``max(max_batch_size,
            256)`` on CUDA). Within them, texts of similar length are grouped to save padding, so younger texts
            can overtake older ones of another length: a longer look-ahead pads less but spreads latencies (all-
            MiniLM-L6-v2, 128 single-sentence callers, 2 cores: p99 / p50 of 2.1 with 256, 1.2-1.4 with 16-32,
            same throughput; benchmarks/README.md). A CPU gains little from batches beyond a few dozen texts; a
            GPU needs large ones.
        share_tokens: under a light load (more than one request in flight, at most ``2 x workers x
            share_tokens`` tokens queued), a batch holds at most ``max(share_tokens, queued tokens / workers)``
            padded tokens: its worker's share of the queue, and at least this many (default 128: three or four
            typical sentences). A worker then leaves part of a long batch to the next free worker
            instead of running it all on its one core while the other finishes its short one. Under a heavier
            load batches fill as before: splitting them would cost calls, and split multi-text requests across
            batches (all-MiniLM-L6-v2, 2 cores, over HTTP: 8 single-sentence clients' p99 9-12% lower than
            without the split; benchmarks/README.md, "A worker's share of a light queue"). 0: no split. Only
            where workers run side by side on a twin of the model (see ``workers``): not with one worker, nor on
            CUDA.
        workers: worker threads, each taking the next batch and running it (default 1). With N > 1 on the
            CPU, the batcher makes a twin of the model (:func:`narrow_twin`: a second ONNX Runtime session on
            the model's threads / N, so the model's weights are in memory twice). Under load, up to N batches
            then run side by side on the twin, each on its share of the cores, instead of one at a time across
            all of them: small batches scale badly across threads (all-MiniLM-L6-v2, single sentences, 2 cores:
            see benchmarks/README.md). A batch that would run alone (nothing else queued or running, or only the rest
            of the one request in flight) takes every slot and runs on the model itself, with all its threads, so
            a lone caller is not slowed down. With a ``run_lock``, give it ``slots=N``; on CUDA the workers share
            the one session.

    The worker thread starts with the first request. Use as a context manager,
    or call :meth:`close`, which finishes what was admitted; a closed batcher
    refuses new requests with :class:`BatcherClosedError`.
    """

    #: encode_async tokenizes inputs up to this many characters on the event loop (cheaper than a thread hop).
    INLINE_TOKENIZE_CHARS = 4096

    def __init__(self, embedder, *, max_batch_tokens: int = 16384, max_batch_size: int = 256,
                 max_wait_ms: float = 2.0, max_queue: int = 1024, merge_requests: bool = True,
                 tokenizer_threads: int | None = None, call_cost_tokens: float | None = None,
                 run_lock: RunLock | None = None, max_queue_texts: int | None = None,
                 max_queue_tokens: int | None = None, queue_policy: str = "deadline", workers: int = 1,
                 lookahead_texts: int | None = None, share_tokens: int = 128):
        for attr in ("tokenizer", "embed_token_ids", "postprocess", "config"):
            if not hasattr(embedder, attr):
                raise TypeError(f"embedder must be an embfast.Embedder or CrossEncoder, got {type(embedder).__name__}")
        self.embedder = embedder
        #: "embedder" (encode / encode_async), "cross-encoder" (predict / predict_async) or "sparse-encoder"
        #: (encode_sparse / encode_sparse_async)
        self.kind = ("cross-encoder" if hasattr(embedder, "format_scores") else
                     "sparse-encoder" if hasattr(embedder, "decode") else "embedder")
        self.max_batch_tokens = _check_int("max_batch_tokens", max_batch_tokens, 1)
        self.max_batch_size = _check_int("max_batch_size", max_batch_size, 1)
        if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float)) or not 0 <= max_wait_ms <= 60_000:
            raise ValueError(f"max_wait_ms must be a number in [0, 60000], got {max_wait_ms!r}")
        self.max_wait_ms = float(max_wait_ms)
        self.max_queue = _check_int("max_queue", max_queue, 1)
        self.max_queue_texts = (DEFAULT_MAX_QUEUE_TEXTS if max_queue_texts is None
                                else _check_int("max_queue_texts", max_queue_texts, 1))
        seq = int(getattr(getattr(embedder, "tokenizer", None), "max_seq_length", None) or 512)
        if max_queue_tokens is None:
            max_queue_tokens = DEFAULT_QUEUE_TOKEN_REQUESTS * 2048 * seq
        self.max_queue_tokens = _check_int("max_queue_tokens", max_queue_tokens, 1)
        self.merge_requests = bool(merge_requests)
        self.tokenizer_threads = (_default_tokenizer_threads() if tokenizer_threads is None
                                  else _check_int("tokenizer_threads", tokenizer_threads, 1))
        if call_cost_tokens is None:
            call_cost_tokens = 2048.0 if getattr(embedder, "device", "cpu") == "cuda" else 32.0
        self._cost_model = None
        if call_cost_tokens == "auto":
            call_cost_tokens = 32.0  # until the fit has enough batches
            self._cost_model = CallCostEstimator(floor=8.0, ceiling=float(self.max_batch_tokens))
        if isinstance(call_cost_tokens, bool) or not isinstance(call_cost_tokens, (int, float)) \
                or not call_cost_tokens >= 0:
            raise ValueError(f"call_cost_tokens must be a number >= 0 or 'auto', got {call_cost_tokens!r}")
        self.call_cost_tokens = float(call_cost_tokens)
        if run_lock is not None and not isinstance(run_lock, RunLock):
            raise TypeError(f"run_lock must be an embfast.dynamic.RunLock or None, got {type(run_lock).__name__}")
        self.run_lock = run_lock
        if queue_policy not in QUEUE_POLICIES:
            raise ValueError(f"queue_policy must be one of {', '.join(QUEUE_POLICIES)}, got {queue_policy!r}")
        self.queue_policy = queue_policy
        self.workers = _check_int("workers", workers, 1)
        # seconds per padded token of recent batches (moving average); the first guess is a small CPU model's
        self._s_per_token = 2e-4 if getattr(embedder, "device", "cpu") != "cuda" else 1e-6
        # deadlines: a request no larger than one text of max_seq_length tokens counts as that large, so texts sent
        # one per request are served in arrival order whatever their lengths (issue 13: with its own length, a long
        # sentence was overtaken by shorter later ones and set the p99); larger requests still go by size
        self._deadline_floor = float(seq)
        self._seq = 0
        # Slots for this batcher's calls: the shared lock, or one of its own when several workers share the cores.
        self._slots = run_lock if run_lock is not None else (RunLock(self.workers) if self.workers > 1 else None)
        # With several workers on the CPU: a twin on cores / workers threads for calls that run side by side; a
        # call that would run alone widens to all the slots and runs on the model itself, with all its threads.
        self._narrow = None
        if self.workers > 1:
            threads = getattr(getattr(embedder, "session", None), "threads", 1)
            self._narrow = narrow_twin(embedder, max(1, threads // self.workers))
        if lookahead_texts is None:
            lookahead_texts = 32 if getattr(embedder, "device", "cpu") != "cuda" else max(self.max_batch_size, 256)
        self.lookahead_texts = _check_int("lookahead_texts", lookahead_texts, 1)
        self.share_tokens = _check_int("share_tokens", share_tokens, 0)
        self._hidden = int(embedder.config.dim)

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # guards the queue and the counts below
        # Idle workers, each on its own condition over the same lock; the last to go idle is woken first (see
        # _sleep).
        self._idle: list[threading.Condition] = []
        self._wakers: dict[int, threading.Condition] = {}
        self._pending: list[_Request] = []  # requests with rows not yet batched, by (deadline, arrival)
        self._pending_texts = 0
        self._pending_tokens = 0
        self._in_flight = 0  # admitted and not finished (tokenizing, queued or running)
        self._load_texts = 0  # texts of the queued or running requests (admitted, not finished)
        self._load_tokens = 0  # and their tokens
        self._ema_seconds = 0.0  # worker time, texts and tokens of recent batches (decaying sums):
        self._ema_texts = 0.0  # their ratios are the throughput retry-after estimates use
        self._ema_tokens = 0.0
        self._company = 1.0  # moving average of the requests in flight seen by each arriving one (itself included)
        self._closing = False
        self._counts = {"requests": 0, "rejected": 0, "cancelled": 0, "failed": 0, "batches": 0, "texts": 0}
        self._listeners: list[Callable[[BatchStats], None]] = []
        self._tok_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._worker_threads: list[threading.Thread] = []  # started by the first request
        self._claimed = False  # a worker is between _wait_for_work and _take_batch (waiting for a run slot)
        self._running = 0  # batches being computed now (their callers may have gone: see close / cancel)
        if run_lock is not None:  # once built: the other models' workers may ask has_work() from now on
            run_lock.register(self)

    # ---- public API --------------------------------------------------------------------------
    def has_work(self) -> bool:
        """Texts queued or a batch running now (read without the lock: a hint, not a promise)."""
        return bool(self._pending) or self._running > 0

    def encode(self, sentences, normalize_embeddings: bool | None = None, *, prompt: str | None = None,
               prompt_name: str | None = None, truncate: bool = True, truncate_dim: int | None = None,
               precision: str = "float32", convert_to_numpy: bool = True, return_info: bool = False,
               timeout: float | None = None, truncation_side: str = "right"):
        """Embed texts, batched with whatever other callers are sending; blocks the calling thread.

        Args:
            sentences: a str, or a list of str (may be empty).
            normalize_embeddings: L2-normalize; None follows the model.
            prompt / prompt_name: as :meth:`Embedder.encode`.
            truncate: cut inputs longer than max_seq_length (True) or raise
                :class:`~embfast.InputTooLongError` for this call (False).
            truncation_side: "right" (default) keeps the start of a long input, "left" its end.
            truncate_dim: keep the first dims (Matryoshka) before normalization.
            precision: output precision: float32 | int8 | uint8 | binary | ubinary.
            convert_to_numpy: False returns a list of 1-D arrays.
            return_info: also return an :class:`~embfast.EncodeInfo`.
            timeout: seconds to wait for the result (None = no limit); past it,
                ``TimeoutError`` and the call's texts are dropped from the queue.

        Returns:
            As :meth:`Embedder.encode`: a str gives (dim,), a list (n, dim) float32
            unless ``precision`` says otherwise; with ``return_info`` (embeddings, info).

        Raises:
            OverloadedError: the queue is full (in requests, texts or tokens; ``retry_after_s`` says when to
            retry); its subclass RequestTooLargeError: this call alone holds more texts or tokens than the whole
            queue may. BatcherClosedError: after :meth:`close`.
            TypeError / ValueError: bad input or options (nothing is queued).
        """
        t0 = time.perf_counter()
        self._require("embedder", "encode")
        texts, single, prefix, opts = self._prepare(sentences, normalize_embeddings, prompt, prompt_name,
                                                   truncate, truncate_dim, precision, timeout,
                                                   truncation_side)
        if not texts:
            return self._empty(opts, convert_to_numpy, return_info)
        pooled, (tok, _) = self._submit_wait(lambda: self._tokenize(texts, prefix, truncate, truncation_side),
                                             timeout, "encode")
        return self._finish(pooled, tok, single, opts, convert_to_numpy, return_info, t0)

    async def encode_async(self, sentences, normalize_embeddings: bool | None = None, *,
                           prompt: str | None = None, prompt_name: str | None = None, truncate: bool = True,
                           truncate_dim: int | None = None, precision: str = "float32",
                           convert_to_numpy: bool = True, return_info: bool = False,
                           timeout: float | None = None, truncation_side: str = "right"):
        """The coroutine form of :meth:`encode` (same arguments, results and errors).

        The event loop never runs ONNX Runtime; it tokenizes inputs of up to
        ``INLINE_TOKENIZE_CHARS`` characters itself and hands larger ones to the
        tokenizer threads. Cancelling the awaiting task drops the call's texts.
        """
        t0 = time.perf_counter()
        self._require("embedder", "encode_async")
        texts, single, prefix, opts = self._prepare(sentences, normalize_embeddings, prompt, prompt_name,
                                                   truncate, truncate_dim, precision, timeout,
                                                   truncation_side)
        if not texts:
            return self._empty(opts, convert_to_numpy, return_info)
        chars = sum(map(len, texts)) + len(prefix) * len(texts)
        pooled, (tok, _) = await self._submit_wait_async(
            lambda: self._tokenize(texts, prefix, truncate, truncation_side), chars, timeout, "encode_async")
        return self._finish(pooled, tok, single, opts, convert_to_numpy, return_info, t0)

    async def encode_ids_async(self, token_ids: list, normalize_embeddings: bool | None = None, *,
                               truncate: bool = True, truncate_dim: int | None = None, precision: str = "float32",
                               return_info: bool = False, timeout: float | None = None):
        """Embed inputs given as token ids of the model's own tokenizer, fed as they are (no special tokens
        added; TEI's and vLLM's semantics for token-id input), batched with the other callers.

        Args:
            token_ids: a list of non-empty lists of ints, each in [0, vocabulary size).
            truncate: keep the first ``max_seq_length`` ids of a longer input (True) or raise
                :class:`~embfast.InputTooLongError` (False).
            normalize_embeddings / truncate_dim / precision / return_info / timeout: as :meth:`encode_async`.

        Returns:
            (n, dim) as :meth:`encode_async` (with ``return_info``: (embeddings, info)).

        Raises:
            TypeError / ValueError: not a list of lists of ints, an empty list, an id outside the vocabulary
            (naming the input and the id); InputTooLongError; OverloadedError; BatcherClosedError.
        """
        t0 = time.perf_counter()
        self._require("embedder", "encode_ids_async")
        ids = _check_token_ids(token_ids, self.embedder.tokenizer.tokenizer.get_vocab_size(with_added_tokens=True))
        _, _, _, opts = self._prepare([], normalize_embeddings, None, None, truncate, truncate_dim, precision, timeout)
        if not ids:
            return self._empty(opts, True, return_info)
        limit = self.embedder.tokenizer.max_seq_length
        lengths = np.fromiter((len(r) for r in ids), dtype=np.int64, count=len(ids))
        too_long = lengths > limit
        if too_long.any() and not truncate:
            first = int(np.flatnonzero(too_long)[0])
            raise InputTooLongError(f"input {first} has {int(lengths[first])} token ids, more than "
                                    f"max_seq_length={limit}; pass truncate=True to keep the first {limit}")
        cut = [r[:limit] for r in ids]
        given = Tokenized(ids=cut, lengths=np.minimum(lengths, limit), truncated=too_long)
        pooled, (tok, _) = await self._submit_wait_async(lambda: (given, 0), 0, timeout, "encode_ids_async")
        return self._finish(pooled, tok, False, opts, True, return_info, t0)

    def predict(self, inputs, *, activation_fn=None, apply_softmax: bool = False, truncate: bool = True,
                convert_to_numpy: bool = True, return_info: bool = False, timeout: float | None = None):
        """Score pairs with the batcher's :class:`~embfast.CrossEncoder`, batched with other callers; blocks.

        Args:
            inputs / activation_fn / apply_softmax / truncate / convert_to_numpy / return_info: as
                :meth:`CrossEncoder.predict`.
            timeout: seconds to wait (None = no limit); past it ``TimeoutError`` and the inputs are dropped.

        Returns:
            As :meth:`CrossEncoder.predict`: (n,) or (n, num_labels) float32, a float for one input of a
            one-label model; with ``return_info`` (scores, info).

        Raises:
            TypeError: the batcher serves an embedder. OverloadedError / BatcherClosedError, at once.
            TypeError / ValueError: bad input or options (nothing is queued). InputTooLongError.
        """
        t0 = time.perf_counter()
        items, single = self._prepare_pairs(inputs, activation_fn, truncate, timeout)
        if not items:
            return self._finish_scores(np.zeros((0, self._hidden), np.float32), None, single, activation_fn,
                                       apply_softmax, convert_to_numpy, return_info, t0)
        logits, tok = self._submit_wait(lambda: self._tokenize_pairs(items, truncate), timeout, "predict")
        return self._finish_scores(logits, tok, single, activation_fn, apply_softmax, convert_to_numpy,
                                   return_info, t0)

    async def predict_async(self, inputs, *, activation_fn=None, apply_softmax: bool = False,
                            truncate: bool = True, convert_to_numpy: bool = True, return_info: bool = False,
                            timeout: float | None = None):
        """The coroutine form of :meth:`predict` (same arguments, results and errors)."""
        t0 = time.perf_counter()
        items, single = self._prepare_pairs(inputs, activation_fn, truncate, timeout)
        if not items:
            return self._finish_scores(np.zeros((0, self._hidden), np.float32), None, single, activation_fn,
                                       apply_softmax, convert_to_numpy, return_info, t0)
        chars = sum(len(x) if isinstance(x, str) else len(x[0]) + len(x[1]) for x in items)
        logits, tok = await self._submit_wait_async(lambda: self._tokenize_pairs(items, truncate), chars,
                                                    timeout, "predict_async")
        return self._finish_scores(logits, tok, single, activation_fn, apply_softmax, convert_to_numpy,
                                   return_info, t0)

    def submit_tokenized(self, tok: Tokenized) -> concurrent.futures.Future:
        """Queue texts that are already tokenized (e.g. by ``embedder.tokenizer.tokenize``).

        Args:
            tok: token ids of n texts (ids must come from this embedder's
                tokenizer; ids the model cannot take fail this request alone,
                with ONNX Runtime's error).

        Returns:
            A future of the (n, hidden) float32 pooled vectors, not normalized
            (pass them to :meth:`Embedder.postprocess`). Cancelling it drops the texts.

        Raises:
            OverloadedError (RequestTooLargeError) / BatcherClosedError, at once.
        """
        if not isinstance(tok, Tokenized):
            raise TypeError(f"tok must be an embfast.tokenization.Tokenized, got {type(tok).__name__}")
        if len(tok.ids) == 0:
            fut: concurrent.futures.Future = concurrent.futures.Future()
            fut.set_result(np.zeros((0, self._hidden), dtype=np.float32))
            return fut
        self._reserve()
        try:
            return self._enqueue(tok)
        except BaseException:
            self._release()
            raise

    def add_batch_listener(self, fn: Callable[[BatchStats], None]) -> None:
        """Call ``fn(stats)`` on the worker thread after every batch, once its callers have their rows.

        Keep it quick: the worker waits for it. Its exceptions are logged, never raised.
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        with self._cond:
            self._listeners = [*self._listeners, fn]

    def remove_batch_listener(self, fn: Callable[[BatchStats], None]) -> None:
        """Stop calling ``fn`` (no error if it was not registered)."""
        with self._cond:
            self._listeners = [f for f in self._listeners if f is not fn]

    def stats(self) -> dict:
        """A snapshot: queued_texts, queued_tokens, queued_requests (waiting for a batch), in_flight_requests,
        in_flight_texts, in_flight_tokens (admitted and not finished: what max_queue, max_queue_texts and
        max_queue_tokens count), running_batches (being computed now, also for callers that have gone),
        closed, and the running totals requests, rejected (refused as overloaded), cancelled, failed, batches,
        texts."""
        with self._cond:
            return {"queued_texts": self._pending_texts, "queued_tokens": self._pending_tokens,
                    "queued_requests": len(self._pending), "in_flight_requests": self._in_flight,
                    "in_flight_texts": self._load_texts, "in_flight_tokens": self._load_tokens,
                    "running_batches": self._running, "closed": self._closing, **self._counts}

    @property
    def closed(self) -> bool:
        return self._closing

    def close(self, timeout: float | None = None, *, cancel_pending: bool = False) -> bool:
        """Stop taking requests, finish every admitted one, then stop the worker.

        Args:
            timeout: seconds to wait for the worker (None = until done).
            cancel_pending: fail requests whose texts have not all been batched
                with :class:`BatcherClosedError` instead of running them.

        Returns:
            True when the worker has finished (False: still draining after ``timeout``).
        """
        dropped: list[_Request] = []
        with self._cond:
            self._closing = True
            if self._in_flight:  # admitted requests still tokenizing: the worker must outlive them
                self._start_worker()
            if cancel_pending:
                dropped = list(self._pending)
                self._pending.clear()
                self._pending_texts = self._pending_tokens = 0
            self._wake_all()
        for req in dropped:
            self._fail(req, BatcherClosedError("the batcher was closed before this request ran"))
        end = None if timeout is None else time.monotonic() + timeout
        for worker in self._worker_threads:
            if threading.current_thread() is not worker:
                worker.join(None if end is None else max(0.0, end - time.monotonic()))
        done = not any(w.is_alive() for w in self._worker_threads)
        if done and self._tok_pool is not None:
            self._tok_pool.shutdown(wait=False)
        return done

    def __enter__(self) -> DynamicBatcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"DynamicBatcher({self.embedder!r}, max_batch_tokens={self.max_batch_tokens}, "
                f"max_batch_size={self.max_batch_size}, max_wait_ms={self.max_wait_ms}, "
                f"max_queue={self.max_queue}, max_queue_texts={self.max_queue_texts}, "
                f"max_queue_tokens={self.max_queue_tokens}, merge_requests={self.merge_requests})")

    # ---- caller side ---------------------------------------------------------------------------
    def _prepare(self, sentences, normalize_embeddings, prompt, prompt_name, truncate, truncate_dim, precision,
                 timeout, truncation_side="right"):
        """Validate everything before anything is queued. Returns (texts, single, prefix, postprocess opts)."""
        texts, single = as_text_list(sentences)
        if precision not in OUTPUT_PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(OUTPUT_PRECISIONS)}, got {precision!r}")
        if not isinstance(truncate, bool):
            raise TypeError(f"truncate must be a bool, got {type(truncate).__name__}")
        if truncation_side not in ("right", "left"):
            raise ValueError(f"truncation_side must be 'right' or 'left', got {truncation_side!r}")
        if normalize_embeddings is not None and not isinstance(normalize_embeddings, (bool, np.bool_)):
            raise TypeError(f"normalize_embeddings must be a bool or None, got {type(normalize_embeddings).__name__}")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout > 0):
            raise ValueError(f"timeout must be a number of seconds > 0 or None, got {timeout!r}")
        if truncate_dim is not None:
            truncate_dim = self.embedder._check_truncate_dim(truncate_dim)
        prefix = self.embedder._prompt_text(prompt, prompt_name)
        opts = {"normalize_embeddings": normalize_embeddings, "truncate_dim": truncate_dim, "precision": precision}
        return texts, single, prefix, opts

    def _tokenize(self, texts: list[str], prefix: str, truncate: bool,
                  truncation_side: str = "right") -> tuple[Tokenized, int]:
        """Tokenize (prompt prepended); also the prompt tokens pooling leaves out (0 unless include_prompt: false)."""
        skip = 0
        if prefix:
            texts = [prefix + t for t in texts]
            if not getattr(self.embedder.config, "include_prompt", True):
                skip = self.embedder.tokenizer.prompt_length(prefix)
        return self.embedder.tokenizer.tokenize(texts, truncate=truncate, truncation_side=truncation_side), skip

    def _tokenizer_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._cond:
            if self._tok_pool is None:
                self._tok_pool = concurrent.futures.ThreadPoolExecutor(
                    self.tokenizer_threads, thread_name_prefix="embfast-tokenize",
                    initializer=name_os_thread, initargs=("embfast-tok",))
            return self._tok_pool

    def _empty(self, opts: dict, convert_to_numpy: bool, return_info: bool):
        # The facade's own answer for no input (shape, dtype and errors as encode([]) gives).
        return self.embedder.encode([], convert_to_numpy=convert_to_numpy, return_info=return_info, **opts)

    # ---- shared by every kind: admission, queueing, waiting -----------------------------------
    def _submit_wait(self, tokenize: Callable, timeout: float | None, what: str):
        """Admit, tokenize (``tokenize()`` -> (Tokenized, prompt_length) or Tokenized), queue and wait.

        Returns (rows, what ``tokenize`` returned).
        """
        self._reserve()
        try:
            made = tokenize()
            fut = self._enqueue(*(made if isinstance(made, tuple) else (made,)))
        except BaseException:
            self._release()
            raise
        try:
            return fut.result(timeout), made
        except concurrent.futures.TimeoutError:
            if fut.cancel():
                raise TimeoutError(f"{what} did not finish within timeout={timeout} s; its texts were "
                                   "dropped from the queue") from None
            return fut.result(), made  # finished while timing out
        except BaseException:
            fut.cancel()  # e.g. KeyboardInterrupt: do not leave work for nobody
            raise

    async def _submit_wait_async(self, tokenize: Callable, chars: int, timeout: float | None, what: str):
        """:meth:`_submit_wait` for coroutines: small inputs (``chars``) tokenize on the loop, large ones on
        the tokenizer threads; cancelling the awaiting task drops the texts."""
        self._reserve()
        try:
            if chars <= self.INLINE_TOKENIZE_CHARS:
                made = tokenize()
            else:
                made = await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool(), tokenize)
            fut = self._enqueue(*(made if isinstance(made, tuple) else (made,)))
        except BaseException:
            self._release()
            raise
        waiter = asyncio.wrap_future(fut)  # cancelling it cancels fut, which drops the texts
        try:
            return await (waiter if timeout is None else asyncio.wait_for(waiter, timeout)), made
        except asyncio.TimeoutError:  # the builtin TimeoutError from 3.11 on
            raise TimeoutError(f"{what} did not finish within timeout={timeout} s; its texts were "
                               "dropped from the queue") from None

    _KINDS = {"embedder": ("an Embedder", "encode / encode_async"),
              "cross-encoder": ("a CrossEncoder", "predict / predict_async"),
              "sparse-encoder": ("a SparseEncoder", "encode_sparse / encode_sparse_async")}

    def _require(self, kind: str, what: str) -> None:
        if self.kind != kind:
            raise TypeError(f"{what} needs a batcher over {self._KINDS[kind][0]}; this one serves "
                            f"{self._KINDS[self.kind][0]}: use {self._KINDS[self.kind][1]}")

    # ---- cross-encoder callers ------------------------------------------------------------------
    def _prepare_pairs(self, inputs, activation_fn, truncate, timeout) -> tuple[list, bool]:
        from embfast.cross_encoder import parse_pairs

        self._require("cross-encoder", "predict")
        items, single = parse_pairs(inputs)
        if not isinstance(truncate, bool):
            raise TypeError(f"truncate must be a bool, got {type(truncate).__name__}")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout > 0):
            raise ValueError(f"timeout must be a number of seconds > 0 or None, got {timeout!r}")
        self.embedder._activation(activation_fn)  # refuse a bad one before queueing
        return items, single

    def _tokenize_pairs(self, items: list, truncate: bool) -> Tokenized:
        return self.embedder.tokenizer.tokenize(items, truncate=truncate)

    def _finish_scores(self, logits, tok: Tokenized | None, single: bool, activation_fn, apply_softmax: bool,
                       convert_to_numpy: bool, return_info: bool, t0: float):
        model = self.embedder
        result = model.format_scores(model.postprocess(logits, activation_fn=activation_fn,
                                                       apply_softmax=apply_softmax), single, convert_to_numpy)
        if not return_info:
            return result
        if tok is None:
            tok = Tokenized([], np.zeros(0, np.int64), np.zeros(0, bool))
        return result, EncodeInfo(tok.lengths, tok.truncated, time.perf_counter() - t0)

    def _finish(self, pooled, tok: Tokenized, single: bool, opts: dict, convert_to_numpy: bool,
                return_info: bool, t0: float):
        emb = self.embedder.postprocess(pooled, **opts)
        result = emb[0] if single else (emb if convert_to_numpy else list(emb))
        if not return_info:
            return result
        return result, EncodeInfo(tok.lengths, tok.truncated, time.perf_counter() - t0)

    def _reserve(self) -> None:
        """Admit one request or refuse it at once (full queue, or closed)."""
        with self._cond:
            if self._closing:
                raise BatcherClosedError("the batcher is closed and takes no new requests")
            if self._in_flight >= self.max_queue:
                self._counts["rejected"] += 1
                # room for one more once the oldest requests' share of the backlog has drained
                share = (self._in_flight - self.max_queue + 1) / self._in_flight
                raise OverloadedError(f"the queue is full: {self._in_flight} requests are waiting or running "
                                      f"(max_queue={self.max_queue}); retry later",
                                      self._retry_after(share * self._load_tokens, self._ema_tokens))
            self._in_flight += 1
            self._counts["requests"] += 1

    def _release(self) -> None:
        with self._cond:
            self._in_flight -= 1
            if self._closing:  # a worker waiting to exit once nothing is in flight
                self._wake_all()

    def _retry_after(self, backlog: float, ema_units: float) -> int:
        """Whole seconds (1 .. RETRY_AFTER_MAX_S) to run ``backlog`` texts or tokens at the recent throughput
        (``ema_units`` per ``_ema_seconds``); 1 before any batch was measured. Lock held."""
        if backlog <= 0 or ema_units <= 0 or self._ema_seconds <= 0:
            return 1
        return int(min(RETRY_AFTER_MAX_S, max(1, np.ceil(backlog * self._ema_seconds / ema_units))))

    def _admit(self, texts: int, tokens: int) -> None:
        """Count a tokenized request against max_queue_texts / max_queue_tokens, or refuse it. Lock held."""
        checks = (("texts", texts, self._load_texts, self.max_queue_texts, self._ema_texts),
                  ("tokens", tokens, self._load_tokens, self.max_queue_tokens, self._ema_tokens))
        for unit, cost, _, budget, _ in checks:  # never fits: say so first, whatever the queue holds
            if cost > budget:
                raise RequestTooLargeError(
                    f"this request has {cost} {unit}, more than the whole queue may hold (max_queue_{unit}="
                    f"{budget}): split it into smaller requests", RETRY_AFTER_MAX_S)
        for unit, cost, load, budget, ema in checks:
            large = cost > SMALL_SHARE * budget and self._load_texts > 0
            limit = int(LARGE_FILL * budget) if large else budget
            if load + cost > limit:
                self._counts["rejected"] += 1
                rule = (f"; a request over 1/{round(1 / SMALL_SHARE)} of it may fill the queue only to "
                        f"{LARGE_FILL:.0%}") if large else ""
                raise OverloadedError(
                    f"the queue is full: {load} {unit} are waiting or running and this request has {cost} "
                    f"(max_queue_{unit}={budget}{rule}); retry later",
                    self._retry_after(load + cost - limit, ema))

    def _enqueue(self, tok: Tokenized, prompt_length: int = 0) -> concurrent.futures.Future:
        """Admit (texts and tokens) and queue a request that holds a request slot; from here its future's
        completion releases the admission. Raises OverloadedError with nothing queued."""
        req = _Request(tok, self._hidden, prompt_length)
        texts, tokens = len(req.ids), int(req.lengths.sum())
        with self._cond:
            self._admit(texts, tokens)
            self._load_texts += texts
            self._load_tokens += tokens
            self._start_worker()
            self._company = 0.8 * self._company + 0.2 * self._in_flight
            self._seq += 1
            req.seq = self._seq
            if self.queue_policy == "deadline":
                req.deadline = req.t_enqueue + max(float(req.lengths.sum()), self._deadline_floor) * self._s_per_token
            bisect.insort(self._pending, req, key=_urgency)
            self._pending_texts += len(req.ids)
            self._pending_tokens += tokens
            self._wake_one()  # whoever claims the batch wakes the next worker if texts are left
        req.future.add_done_callback(lambda fut: self._on_done(fut, texts, tokens))
        return req.future

    def _start_worker(self) -> None:
        """Start the worker threads if they are not running yet. Lock held."""
        if not self._worker_threads:
            for i in range(self.workers):
                name = "embfast-batcher" if self.workers == 1 else f"embfast-batcher-{i}"
                thread = threading.Thread(target=self._run, args=(name, i), name=name, daemon=True)
                self._worker_threads.append(thread)
                thread.start()

    def _on_done(self, fut: concurrent.futures.Future, texts: int = 0, tokens: int = 0) -> None:
        # Runs in whichever thread finished or cancelled the future, never with the lock held.
        with self._cond:
            self._in_flight -= 1
            self._load_texts -= texts
            self._load_tokens -= tokens
            if fut.cancelled():
                self._counts["cancelled"] += 1
                self._purge()  # its texts leave the queue now (the queue gauges stay true)
            if self._closing:  # a worker waiting to exit once nothing is in flight
                self._wake_all()

    # ---- worker side -----------------------------------------------------------------------------
    def _run(self, name: str = "embfast-batcher", index: int = 0) -> None:
        name_os_thread(name)
        while True:
            if not self._wait_for_work(index):
                return
            # The batch is planned only once this model may run: with a shared run lock (several models), the
            # texts that arrived while another model ran join this batch instead of waiting for the next one.
            slots, wide = self._slots, False
            if slots is not None:
                slots.acquire()
            try:
                try:
                    batch, queued, plan_seconds, lone = self._take_batch()
                except BaseException:  # pragma: no cover - a bug in assembly must not kill the worker
                    log.exception("embfast batcher: batch assembly failed")
                    time.sleep(0.01)
                    continue
                if not batch:  # everything waiting was cancelled meanwhile
                    continue
                try:  # _take_batch counted the batch in _running
                    model = self.embedder
                    if self._narrow is not None:
                        # alone (nothing left queued, or only the rest of the one request in flight; no other call
                        # running or waiting): all the cores; else its share
                        wide = (queued == 0 or lone) and slots.widen()
                        model = self.embedder if wide else self._narrow
                    self._execute(batch, queued, plan_seconds, model)
                except BaseException as exc:  # pragma: no cover - never leave callers waiting on a dead worker
                    log.exception("embfast batcher: batch execution failed")
                    for req, _ in batch:
                        self._fail(req, exc)
                finally:
                    with self._cond:
                        self._running -= 1
            finally:
                if slots is not None:
                    slots.release(wide)

    def _purge(self) -> None:
        """Drop requests that are already done (cancelled, timed out or failed) from the queue. Lock held."""
        if not any(r.future.done() for r in self._pending):
            return
        keep: list[_Request] = []
        for r in self._pending:
            if r.future.done():
                self._pending_texts -= len(r.todo)
                self._pending_tokens -= int(r.lengths[r.todo].sum())
            else:
                keep.append(r)
        self._pending = keep

    def _budget_reached(self) -> bool:
        return self._pending_texts >= self.max_batch_size or self._pending_tokens >= self.max_batch_tokens

    def _wait_for_work(self, index: int = 0) -> bool:
        """Wait until this worker should take a batch (work pending, no other worker about to take one, and, in a
        crowd, ``max_wait_ms`` of company waited for); False when the batcher is closed and drained. True claims
        the next batch: :meth:`_take_batch` must follow."""
        with self._cond:
            while True:
                self._purge()
                if not self._pending:
                    if self._closing and self._in_flight == 0:
                        return False
                    self._sleep()
                    continue
                if self._claimed:  # another worker takes the next batch first; then this one looks again
                    self._sleep()
                    continue
                if index > 0 and self._pending_texts < self.lookahead_texts and self.run_lock is not None \
                        and self.run_lock.others_busy(self):
                    # Another model sharing the cores has work and this one has less than a full look-ahead
                    # queued: this model keeps one call at a time (its first worker), beside the other model's,
                    # instead of splitting its few texts into smaller batches. Pass the wake-up on to the first
                    # worker; look again in 2 ms.
                    self._wake_one()
                    self._sleep(0.002, last=True)
                    continue
                # Wait for company only when requests have had company lately: a lone sequential
                # caller (always alone in flight) is never made to wait; a crowd merges into fuller batches.
                if self.merge_requests and not self._closing and self.max_wait_ms > 0 and self._company > 1.2:
                    wait = self._pending[0].t_enqueue + self.max_wait_ms / 1000.0 - time.monotonic()
                    if wait > 0 and not self._budget_reached():
                        self._sleep(wait)
                        continue
                self._claimed = True
                return True

    def _sleep(self, timeout: float | None = None, last: bool = False) -> None:
        """Wait, as an idle worker, until woken or ``timeout`` s (``last``: at the bottom of the stack of idle
        workers, woken after every other). Lock held.

        Workers are woken one at a time, the last to go idle first (a stack, as thread pools do): with one
        caller at a time the same thread runs every call, and the other workers stay asleep. Waking them all
        (``notify_all``) woke both of 2 workers about twice per call, and with one caller made its batches
        5-30% slower than 1 worker's and its p99 1.4-2.1x (benchmarks/bench_workers_one_caller.py)."""
        me = threading.get_ident()
        cond = self._wakers.get(me)
        if cond is None:
            cond = self._wakers[me] = threading.Condition(self._lock)
        if last:
            self._idle.insert(0, cond)
        else:
            self._idle.append(cond)
        try:
            cond.wait(timeout)
        finally:
            if cond in self._idle:  # timed out (a woken worker was popped by its waker)
                self._idle.remove(cond)

    def _wake_one(self) -> None:
        """Wake the idle worker that went idle last, if any. Lock held."""
        if self._idle:
            self._idle.pop().notify()

    def _wake_all(self) -> None:
        """Wake every idle worker (closing). Lock held."""
        while self._idle:
            self._idle.pop().notify()

    def _take_batch(self) -> tuple[list[tuple[_Request, np.ndarray]], int, float, bool]:
        """Take one batch from what is pending now: ([(request, rows), ...], texts left queued, seconds spent
        planning, lone); the list is empty when nothing is pending any more. ``lone``: the batch's request is the
        only one in flight, so what is left queued is its own rest. A batch returned counts in ``_running`` until
        the caller takes it out.

        Texts left queued wake another worker, except a lone request's rest on the CPU: its batches run one after
        the other, each on all the cores, as with one worker. Run side by side on a core each, a request's
        unequal batches (the planner splits by length) finish with the slower one: one caller sending 8
        sentences per request had a p99 of 45-50 ms with 2 workers against 42-43 ms with 1, and 34-40 ms
        against 36-40 ms since (benchmarks/bench_workers_one_caller.py --texts-per-call 8)."""
        with self._cond:
            self._claimed = False
            self._purge()
            if not self._pending:
                return [], 0, 0.0, False
            t_plan = time.perf_counter()
            batch = self._select()
            self._running += 1
            # (on CUDA a second worker overlaps its host work with the first one's GPU call: worth it even for
            # one request)
            lone = self._in_flight == 1 and getattr(self.embedder, "device", "cpu") == "cpu"
            if self._pending and not lone:  # texts of other requests are left: another worker may claim them
                self._wake_one()
            return batch, self._pending_texts, time.perf_counter() - t_plan, lone

    def _select(self) -> list[tuple[_Request, np.ndarray]]:
        """Plan the most urgent pending texts (earliest deadline, see ``queue_policy``) into length-sorted batches;
        take the one holding the most urgent text. Lock held.

        Each taken request's rows stay ascending. A lone text skips the planner, and the bookkeeping works on
        boolean masks: with NumPy set operations, picking one single-text request took 162 us in a worker just
        woken up (3% of a sentence's whole call on 2 cores), and 3x as long as now for 32 queued sentences
        (benchmarks/bench_plan.py)."""
        pool: list[_Request] = []
        sizes: list[int] = []
        n = 0
        for req in self._pending:
            pool.append(req)
            sizes.append(len(req.todo))
            n += sizes[-1]
            if not self.merge_requests or n >= self.lookahead_texts:
                break
        if n == 1:  # one text (the lone caller's single sentence, or batching off): nothing to plan
            req = pool[0]
            take, req.todo = req.todo, req.todo[:0]
            self._pending_texts -= 1
            self._pending_tokens -= int(req.lengths[take[0]])
            self._pending.remove(req)  # the first in the queue: O(1)
            return [(req, take)]
        lengths = np.concatenate([r.lengths[r.todo] for r in pool])
        # Index 0 is the most urgent request's first unbatched text: the batch holding it goes now.
        cost = self.call_cost_tokens
        if self._cost_model is not None:
            cost = self._cost_model.tokens() or cost
        plan = plan_by_cost(lengths, self.max_batch_size, self._batch_tokens(), cost)
        chosen = next(b for b in plan if (b == 0).any())
        taken = np.zeros(n, dtype=bool)
        taken[chosen] = True
        batch: list[tuple[_Request, np.ndarray]] = []
        start = 0
        for req, size in zip(pool, sizes, strict=True):
            mine = taken[start:start + size]
            start += size
            if size == 1:  # single-text requests, common under load: no fancy indexing (111 against 152 us at 32)
                if not mine[0]:
                    continue
                take, req.todo = req.todo, req.todo[:0]
            else:
                if not mine.any():
                    continue
                take, req.todo = req.todo[mine], req.todo[~mine]
            self._pending_texts -= len(take)
            self._pending_tokens -= int(req.lengths[take].sum())
            batch.append((req, take))
        if any(len(r.todo) == 0 for r, _ in batch):
            self._pending = [r for r in self._pending if len(r.todo)]
        return batch

    def _batch_tokens(self) -> int:
        """The padded-token budget of the next batch: ``max_batch_tokens``, or, with several workers on the CPU
        sharing the queue, this worker's share of it (see ``share_tokens``). Lock held."""
        if self._narrow is None or not self.share_tokens or not self.merge_requests or self._in_flight <= 1 \
                or self._pending_tokens > 2 * self.workers * self.share_tokens:  # none, one caller, or a crowd
            return self.max_batch_tokens
        return min(self.max_batch_tokens, max(self.share_tokens, -(-self._pending_tokens // self.workers)))

    def _run_rows(self, groups: list[tuple[_Request, np.ndarray]], model=None) -> np.ndarray:
        model = self.embedder if model is None else model
        ids = [req.ids[r] for req, take in groups for r in take]
        if any(req.type_ids is not None for req, _ in groups):  # pairs: segment ids travel with the ids
            type_ids = [req.type_ids[r] if req.type_ids is not None else [0] * len(req.ids[r])
                        for req, take in groups for r in take]
            return model.embed_token_ids(ids, np.arange(len(ids)), type_ids=type_ids)
        if not any(req.prompt_length for req, _ in groups):
            return model.embed_token_ids(ids, np.arange(len(ids)))
        skip = np.concatenate([np.full(len(take), req.prompt_length, dtype=np.int64) for req, take in groups])
        return model.embed_token_ids(ids, np.arange(len(ids)), prompt_length=skip)

    def _execute(self, batch: list[tuple[_Request, np.ndarray]], queued: int, plan_seconds: float = 0.0,
                 model=None) -> None:
        model = self.embedder if model is None else model
        t0 = time.perf_counter()
        wait = time.monotonic() - min(req.t_enqueue for req, _ in batch)
        lens = np.concatenate([req.lengths[take] for req, take in batch])
        failed = 0
        try:
            out = self._run_rows(batch, model)
            results = []
            start = 0
            for req, take in batch:
                results.append((req, take, out[start:start + len(take)]))
                start += len(take)
        except Exception as exc:
            if len(batch) == 1:
                results = [(batch[0][0], batch[0][1], exc)]
            else:  # find the culprit: each caller's rows alone, so one bad input fails only its caller
                results = []
                for req, take in batch:
                    try:
                        results.append((req, take, self._run_rows([(req, take)], model)))
                    except Exception as exc_one:
                        results.append((req, take, exc_one))
        seconds = time.perf_counter() - t0
        padded = len(lens) * int(max(lens.max(), 1))
        self._s_per_token = 0.8 * self._s_per_token + 0.2 * seconds / padded
        if self._cost_model is not None and not any(isinstance(r, Exception) for _, _, r in results):
            # the worker's whole cycle for this batch: planning + the call
            self._cost_model.add(len(lens) * int(max(lens.max(), 1)), seconds + plan_seconds)
        for req, take, res in results:
            if isinstance(res, Exception):
                failed += 1
                self._fail(req, res)
                continue
            if req.future.done():  # cancelled, timed out or failed meanwhile: drop its rows
                continue
            req.pooled[take] = res
            req.remaining -= len(take)
            if req.remaining == 0:
                self._succeed(req)
        with self._cond:
            self._counts["batches"] += 1
            self._counts["texts"] += len(lens)
            # decaying sums (about the last 20 batches) for the throughput behind retry-after
            self._ema_seconds = 0.95 * self._ema_seconds + seconds
            self._ema_texts = 0.95 * self._ema_texts + len(lens)
            self._ema_tokens = 0.95 * self._ema_tokens + float(lens.sum())
            listeners = self._listeners
        if listeners:
            stats = BatchStats(texts=len(lens), requests=len(batch), tokens=int(lens.sum()),
                               padded_tokens=len(lens) * int(max(lens.max(), 1)), seconds=seconds,
                               queued_texts=queued, failed_requests=failed, wait_seconds=wait,
                               plan_seconds=plan_seconds,
                               threads=int(getattr(model.session, "threads", 0)) if model.device == "cpu" else 0)
            for fn in listeners:
                try:
                    fn(stats)
                except Exception:
                    log.exception("embfast batcher: batch listener %r failed", fn)

    @staticmethod
    def _succeed(req: _Request) -> None:
        try:
            if req.future.set_running_or_notify_cancel():
                req.future.set_result(req.pooled)
        except (RuntimeError, concurrent.futures.InvalidStateError):
            pass  # failed by close(cancel_pending=True) meanwhile

    def _fail(self, req: _Request, exc: BaseException) -> None:
        """Give a request its error (no-op if it was cancelled or already done)."""
        try:
            if req.future.set_running_or_notify_cancel():
                req.future.set_exception(exc)
                with self._cond:
                    self._counts["failed"] += 1
        except (RuntimeError, concurrent.futures.InvalidStateError):
            pass  # already running or finished
