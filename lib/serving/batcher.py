"""Dynamic batching: one worker thread owns the model; requests queue and leave in batches.

A request is a list of units (a text, or one window of a long text), each with a token length.
The worker takes units first-in first-out and closes a batch when it holds `max_batch` units, when
the next unit would push the padded batch (rows and length rounded up to their buckets) past
`max_tokens`, or when `max_wait_ms` have passed since the oldest queued unit arrived (Triton's max
queue delay: 0 = take what is queued now, never wait), or, given the caller's count of open
requests, when all of them are in the batch already. A closed batch is then split into model
calls by `plan_calls` (units of similar length together, so that short texts are not padded to
the longest one's bucket). Each request's future gets its units' outputs in the order it gave them.
"""

import bisect
import collections
import concurrent.futures
import dataclasses
import threading
import time
from typing import Callable, Sequence


class QueueFullError(RuntimeError):
  """The queue holds `max_queue` units already: the caller should answer 503 and retry later."""


class ShuttingDownError(RuntimeError):
  """The batcher is stopping and takes no new requests."""


def bucket(value: int, buckets: Sequence[int]) -> int:
  """The smallest of the sorted `buckets` >= value.

  Raises:
    ValueError: value exceeds the largest bucket.
  """
  i = bisect.bisect_left(buckets, value)
  if i == len(buckets):
    raise ValueError(f"{value} exceeds the largest bucket {buckets[-1]}")
  return buckets[i]


def powers_of_two(limit: int) -> list:
  """1, 2, 4, ... up to `limit`, and `limit` itself (the row buckets of a batch)."""
  out = [1]
  while out[-1] * 2 < limit:
    out.append(out[-1] * 2)
  return sorted(set(out + [limit]))


@dataclasses.dataclass
class BatchLimits:
  """How batches are formed. max_batch=1 switches batching off (one unit per model call)."""
  max_batch: int = 32
  max_tokens: int = 8192        # padded tokens (rows bucket x length bucket) per batch
  max_wait_ms: float = 5.0
  max_queue: int = 1024         # queued units beyond which submit raises QueueFullError
  length_buckets: tuple = (16, 32, 64, 128)
  # The fixed cost of one model call, in padded tokens: a batch is split into calls of similar
  # length when the padding saved exceeds this per extra call (0: split by bucket freely; a
  # huge value: one call per batch, as the batch was formed).
  call_overhead_tokens: int = 128

  @property
  def row_buckets(self) -> list:
    return powers_of_two(self.max_batch)

  def padded_shape(self, rows: int, length: int) -> tuple:
    """(rows, length) of a batch after rounding each up to its bucket."""
    return bucket(rows, self.row_buckets), bucket(length, self.length_buckets)

  def shapes(self) -> list:
    """Every (rows, length) a batch can take within max_tokens: what warm-up compiles."""
    out = [(r, t) for r in self.row_buckets for t in self.length_buckets
           if r * t <= self.max_tokens or r == 1]
    return out


def plan_calls(lengths: Sequence[int], limits: BatchLimits) -> list:
  """Splits one batch into model calls: lists of indices into `lengths`, each call's padded shape
  (rows and length rounded up to their buckets) among `limits.shapes()`.

  Exact minimum of sum(padded rows x padded length + call_overhead_tokens) over partitions into
  runs of the units sorted by length (a dynamic programme; a batch holds at most max_batch units;
  tested against brute force over all partitions). Calls come shortest first, each in FIFO order.
  """
  order = sorted(range(len(lengths)), key=lambda i: lengths[i])
  n = len(order)
  best = [0.0] + [float("inf")] * n     # best[j]: cost of the first j sorted units
  cut = [0] * (n + 1)
  for j in range(1, n + 1):
    for i in range(j):
      rows, t = limits.padded_shape(j - i, lengths[order[j - 1]])
      cost = best[i] + rows * t + limits.call_overhead_tokens
      if cost < best[j]:
        best[j], cut[j] = cost, i
  calls, j = [], n
  while j > 0:
    calls.append(sorted(order[cut[j]:j]))    # FIFO within a call
    j = cut[j]
  return calls[::-1]


class _Request:
  def __init__(self, payloads, lengths):
    self.payloads, self.lengths = list(payloads), list(lengths)
    self.outputs = [None] * len(self.payloads)
    self.left = len(self.payloads)
    self.future = concurrent.futures.Future()
    self.arrived = time.monotonic()


class Batcher:
  """Queue + one worker thread calling `run_batch(payloads, (rows, length)) -> outputs`.

  `run_batch` receives the units of one batch (at most max_batch, their padded shape within
  max_tokens) and the padded shape, and returns one output per unit, in order.
  """

  def __init__(self, run_batch: Callable, limits: BatchLimits, on_batch: Callable = None,
               in_flight: Callable = None):
    self.run_batch, self.limits, self.on_batch = run_batch, limits, on_batch
    # () -> requests the caller holds open (e.g. the HTTP server's). When given, a batch stops
    # waiting for company as soon as every open request is already in it or queued: nobody else
    # can arrive within max_wait, so waiting would only add latency (a lone client at c=1).
    self.in_flight = in_flight
    self._queue = collections.deque()     # (request, unit index)
    self._cond = threading.Condition()
    self._stopping = False
    self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
    self.batches = 0
    self.units = 0

  def start(self) -> "Batcher":
    self._thread.start()
    return self

  @property
  def depth(self) -> int:
    """Units waiting in the queue."""
    return len(self._queue)

  def submit(self, payloads: Sequence, lengths: Sequence[int]) -> concurrent.futures.Future:
    """Queues one request's units; the future resolves to their outputs in order.

    Raises:
      ValueError: no units, or a unit longer than the largest length bucket.
      QueueFullError: the queue is full. ShuttingDownError: the batcher is stopping.
    """
    if not payloads or len(payloads) != len(lengths):
      raise ValueError(f"need one length per unit and at least one unit, got {len(payloads)} "
                       f"units and {len(lengths)} lengths")
    longest = max(lengths)
    if longest > self.limits.length_buckets[-1]:
      raise ValueError(f"a unit of {longest} tokens exceeds the largest length bucket "
                       f"{self.limits.length_buckets[-1]}")
    req = _Request(payloads, lengths)
    with self._cond:
      if self._stopping:
        raise ShuttingDownError("the server is shutting down")
      if len(self._queue) + len(payloads) > self.limits.max_queue:
        raise QueueFullError(f"queue full ({len(self._queue)} units waiting, max_queue "
                             f"{self.limits.max_queue})")
      self._queue.extend((req, i) for i in range(len(payloads)))
      self._cond.notify()
    return req.future

  def stop(self, drain: bool = True, timeout: float = 60.0) -> None:
    """Takes no new requests; answers the queued ones first when `drain`, else fails them."""
    with self._cond:
      self._stopping = True
      if not drain:
        while self._queue:
          req, _ = self._queue.popleft()
          if not req.future.done():
            req.future.set_exception(ShuttingDownError("the server shut down"))
      self._cond.notify_all()
    if self._thread.is_alive():
      self._thread.join(timeout)

  def _fits(self, units, length: int) -> bool:
    lim = self.limits
    if len(units) + 1 > lim.max_batch:
      return False
    rows, t = lim.padded_shape(len(units) + 1, length)
    return rows * t <= lim.max_tokens

  def _take(self) -> list:
    """Waits for the next batch (FIFO units); [] when stopping with an empty queue."""
    lim = self.limits
    with self._cond:
      while not self._queue and not self._stopping:
        self._cond.wait(0.1)
      if not self._queue:
        return []
      deadline = self._queue[0][0].arrived + lim.max_wait_ms / 1000.0
      units, length = [], 0
      while True:
        while self._queue:
          req, i = self._queue[0]
          new_len = max(length, req.lengths[i])
          if units and not self._fits(units, new_len):
            return units
          units.append(self._queue.popleft())
          length = new_len
          if len(units) == lim.max_batch:
            return units
        left = deadline - time.monotonic()
        if left <= 0 or self._stopping or self._nobody_else(units):
          return units
        self._cond.wait(left)

  def _nobody_else(self, units) -> bool:
    if self.in_flight is None:
      return False
    here = {id(req) for req, _ in units} | {id(req) for req, _ in self._queue}
    return self.in_flight() <= len(here)

  def _loop(self) -> None:
    while True:
      units = self._take()
      if not units:
        return
      self._run(units)

  def _run(self, units) -> None:
    lengths = [req.lengths[i] for req, i in units]
    for call in plan_calls(lengths, self.limits):
      self._call([units[k] for k in call])

  def _call(self, units) -> None:
    length = max(req.lengths[i] for req, i in units)
    shape = self.limits.padded_shape(len(units), length)
    try:
      outputs = self.run_batch([req.payloads[i] for req, i in units], shape)
    except Exception as e:  # pylint: disable=broad-except  # answered to every waiting request
      for req, _ in units:
        if not req.future.done():
          req.future.set_exception(e)
      return
    self.batches += 1
    self.units += len(units)
    if self.on_batch is not None:
      self.on_batch(len(units), shape)
    for (req, i), out in zip(units, outputs):
      req.outputs[i] = out
      req.left -= 1
      if req.left == 0 and not req.future.done():
        req.future.set_result(req.outputs)
