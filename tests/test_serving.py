"""Tests of lib/serving: the batcher (order, limits, max wait, shutdown) and the HTTP server."""

import threading
import time

import pytest

from lib.serving import batcher as B


class Recorder:
  """run_batch that echoes its payloads (times 10) and records each batch's payloads and shape."""

  def __init__(self, delay=0.0, gate=None):
    self.batches, self.delay, self.gate = [], delay, gate

  def __call__(self, payloads, shape):
    if self.gate is not None:
      self.gate.wait(5)
    time.sleep(self.delay)
    self.batches.append((list(payloads), shape))
    return [p * 10 for p in payloads]


def test_bucket_and_row_buckets():
  assert [B.bucket(v, [16, 32]) for v in (1, 16, 17, 32)] == [16, 16, 32, 32]
  with pytest.raises(ValueError, match="exceeds the largest bucket 32"):
    B.bucket(33, [16, 32])
  assert B.powers_of_two(32) == [1, 2, 4, 8, 16, 32]
  assert B.powers_of_two(12) == [1, 2, 4, 8, 12]
  lim = B.BatchLimits(max_batch=8, max_tokens=64, length_buckets=(16, 32))
  assert lim.shapes() == [(1, 16), (1, 32), (2, 16), (2, 32), (4, 16)]


def test_answers_in_order_under_concurrency():
  rec = Recorder()
  b = B.Batcher(rec, B.BatchLimits(max_batch=4, max_wait_ms=2, length_buckets=(8,))).start()
  results, errors = {}, []

  def client(k):
    try:
      payloads = [k * 100 + i for i in range(1 + k % 5)]
      results[k] = (payloads, b.submit(payloads, [3] * len(payloads)).result(10))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)
  threads = [threading.Thread(target=client, args=(k,)) for k in range(40)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  b.stop()
  assert not errors
  for payloads, out in results.values():
    assert out == [p * 10 for p in payloads]
  assert all(len(p) <= 4 for p, _ in rec.batches)
  assert sum(len(p) for p, _ in rec.batches) == sum(1 + k % 5 for k in range(40))


def test_max_batch_and_fifo_when_queued_together():
  gate = threading.Event()
  rec = Recorder(gate=gate)
  b = B.Batcher(rec, B.BatchLimits(max_batch=4, max_wait_ms=0, length_buckets=(8,))).start()
  first = b.submit([0], [1])          # the worker holds this one at the gate
  time.sleep(0.05)
  futures = [b.submit([i], [1]) for i in range(1, 11)]
  gate.set()
  assert first.result(5) == [0]
  assert [f.result(5) for f in futures] == [[i * 10] for i in range(1, 11)]
  b.stop()
  assert [p for p, _ in rec.batches] == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
  assert [s for _, s in rec.batches] == [(1, 8), (4, 8), (4, 8), (2, 8)]


def test_max_tokens_limits_padded_batch():
  gate = threading.Event()
  rec = Recorder(gate=gate)
  lim = B.BatchLimits(max_batch=8, max_tokens=256, max_wait_ms=0, length_buckets=(16, 128))
  b = B.Batcher(rec, lim).start()
  b.submit([0], [1])
  time.sleep(0.05)
  f = b.submit(list(range(1, 6)), [100, 10, 10, 100, 10])
  gate.set()
  assert f.result(5) == [10, 20, 30, 40, 50]
  b.stop()
  # 2 rows x 128 = 256 fits; a third row rounds rows up to 4: 4 x 128 > 256.
  assert [p for p, _ in rec.batches] == [[0], [1, 2], [3, 4], [5]]
  assert all(s[0] * s[1] <= 256 for _, s in rec.batches)


def test_max_wait_is_honoured():
  rec = Recorder()
  b = B.Batcher(rec, B.BatchLimits(max_batch=8, max_wait_ms=200, length_buckets=(8,))).start()
  t0 = time.monotonic()
  assert b.submit([1], [1]).result(5) == [10]
  waited = time.monotonic() - t0
  assert 0.19 <= waited < 1.5, waited      # a lone request waits for company, then goes alone
  b.stop()
  b0 = B.Batcher(Recorder(), B.BatchLimits(max_batch=8, max_wait_ms=0, length_buckets=(8,)))
  b0.start()
  t0 = time.monotonic()
  assert b0.submit([1], [1]).result(5) == [10]
  assert time.monotonic() - t0 < 0.15
  b0.stop()


def test_queue_full_and_too_long_and_errors():
  gate = threading.Event()
  b = B.Batcher(Recorder(gate=gate), B.BatchLimits(max_batch=2, max_queue=3, max_wait_ms=0,
                                                   length_buckets=(8,))).start()
  b.submit([0], [1])
  time.sleep(0.05)
  b.submit([1, 2, 3], [1, 1, 1])
  with pytest.raises(B.QueueFullError, match="max_queue 3"):
    b.submit([4], [1])
  with pytest.raises(ValueError, match="largest length bucket 8"):
    b.submit([5], [9])
  gate.set()
  b.stop()

  def boom(payloads, shape):
    raise RuntimeError("model failed")
  bad = B.Batcher(boom, B.BatchLimits(length_buckets=(8,))).start()
  with pytest.raises(RuntimeError, match="model failed"):
    bad.submit([1], [1]).result(5)
  bad.stop()


def test_stop_drains_the_queue_then_refuses():
  gate = threading.Event()
  b = B.Batcher(Recorder(gate=gate), B.BatchLimits(max_batch=2, max_wait_ms=0,
                                                   length_buckets=(8,))).start()
  futures = [b.submit([i], [1]) for i in range(5)]
  threading.Timer(0.1, gate.set).start()
  b.stop(drain=True)
  assert [f.result(0) for f in futures] == [[i * 10] for i in range(5)]
  with pytest.raises(B.ShuttingDownError):
    b.submit([9], [1])
