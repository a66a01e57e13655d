"""Tests of lib/serving/loadtest.py: counting, concurrency, bounds, percentiles, loopback only;
research/loadtest.py's metrics.json."""

import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from lib.serving import loadtest as L


class FakeServer:
  """A FastAPI app on a free loopback port: POST /v1/x sleeps 20 ms; every 4th request gets 503.
  It records the most requests it ever had in flight."""

  def __init__(self):
    import uvicorn   # pylint: disable=g-import-not-at-top
    from fastapi import FastAPI   # pylint: disable=g-import-not-at-top
    from fastapi.responses import JSONResponse   # pylint: disable=g-import-not-at-top
    self.seen, self.inflight, self.most = 0, 0, 0
    app = FastAPI()

    @app.post("/v1/x")
    async def x(body: dict):
      del body
      self.seen += 1
      n = self.seen
      self.inflight += 1
      self.most = max(self.most, self.inflight)
      await asyncio.sleep(0.02)
      self.inflight -= 1
      return JSONResponse({}, 503 if n % 4 == 0 else 200)
    self.port = L.free_port()
    self.uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                            log_level="warning"))
    self.thread = threading.Thread(target=self.uv.run, daemon=True)
    self.thread.start()
    while not self.uv.started:
      time.sleep(0.02)

  def close(self):
    self.uv.should_exit = True
    self.thread.join(10)


@pytest.fixture(scope="module")
def fake():
  srv = FakeServer()
  yield srv
  srv.close()


def test_counts_statuses_and_concurrency(fake):
  fake.seen = fake.most = 0
  level = L.run_level(f"http://127.0.0.1:{fake.port}", "/v1/x", [{"a": 1}], concurrency=8,
                      requests=40, max_seconds=30)
  assert level.sent == 40 and fake.seen == 40
  assert level.status == {200: 30, 503: 10} and level.ok == 30
  assert fake.most == 8                         # 8 in flight at once, never more
  row = level.row()
  assert row["errors_5xx"] == 10 and row["errors_other"] == 0
  assert 20 <= row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]   # each request sleeps 20 ms
  assert row["throughput_rps"] == pytest.approx(30 / level.seconds)


def test_time_bound_stops_early(fake):
  t0 = time.perf_counter()
  level = L.run_level(f"http://127.0.0.1:{fake.port}", "/v1/x", [{}], concurrency=1,
                      requests=10_000, max_seconds=0.3)
  assert time.perf_counter() - t0 < 3 and level.sent < 100


def test_helpers():
  assert L.percentile([1, 2, 3, 4], 50) == 2.5
  assert L.percentile([10, 20, 30, 40, 50], 95) == pytest.approx(48.0)   # 40 + 0.8 * 10
  text = ('# TYPE serve_batch_size histogram\nserve_batch_size_sum{a="1"} 12.0\n'
          'serve_batch_size_sum{a="2"} 3\nserve_batch_size_count 5\n')
  assert L.scrape(text, "serve_batch_size_sum") == 15.0
  assert L.scrape(text, "serve_batch_size_count") == 5.0
  for url in ("http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:80"):
    L.check_loopback(url)
  for url in ("http://10.0.0.1:8000", "http://example.com", "http://0.0.0.0:80"):
    with pytest.raises(ValueError, match="only targets loopback"):
      L.check_loopback(url)


def test_model_only_plans_and_rates():
  """The three ways cover every unit once; the split way uses the server's plan_calls per batch;
  each call's shape is what the engine would get."""
  from lib.serving import batcher as B   # pylint: disable=g-import-not-at-top
  lim = B.BatchLimits(max_batch=4, length_buckets=(16, 128), call_overhead_tokens=10)
  lengths = [5, 100, 6, 120, 7, 3]
  plans = L.model_only_plans(lengths, lim)
  for calls in plans.values():
    assert sorted(i for c in calls for i in c) == list(range(6))
  assert plans["one_per_call"] == [[i] for i in range(6)]
  assert plans["batched_padded"] == [[0, 1, 2, 3], [4, 5]]
  assert plans["batched_split"] == [[0, 2], [1, 3], [4, 5]]
  shapes = []
  rates = L.model_only(lambda p, shape: shapes.append(shape), [[0] * n for n in lengths], lim,
                       rounds=1)
  assert set(rates) == set(L.MODEL_ONLY) and all(v > 0 for v in rates.values())
  assert shapes[:6] == [(1, 16), (1, 128), (1, 16), (1, 128), (1, 16), (1, 16)]
  assert shapes[6:9] == [(2, 16), (2, 128), (2, 16)] and shapes[9:] == [(4, 128), (2, 16)]


# research/loadtest.py with the servers replaced by made-up measurements: --workdir's metrics.json
# (what tables/serving.py reads) must hold the rows the script printed, as --out does.
_DRIVER = """
import runpy, sys
from lib import cli, model_io
model_io.head_of = lambda source: ("seq_cls", 2, None)
ns = runpy.run_path("research/loadtest.py", run_name="loadtest_under_test")
g = ns["main"].__globals__
def measure(kind, path, bodies, levels):
  assert path == "/v1/classify" and len(bodies) == 3
  return [dict(server=kind, concurrency=c, ok=100 + c, throughput_rps=10.0 * c + len(kind),
               p50_ms=5.0 * c, p95_ms=7.5 * c, p99_ms=9.0 * c, errors_5xx=0, errors_other=c % 2,
               mean_batch=c / 2, compilations_after_warmup=0) for c in levels]
g["_measure"] = measure
g["_bodies"] = lambda dataset: [{"texts": ["a"]}, {"texts": ["b"]}, {"texts": ["c"]}]
sys.argv = ["research/loadtest.py", "--model=fake", "--servers=batched,torch",
            "--concurrency=1,8,32", "--workdir=" + sys.argv[1], "--out=" + sys.argv[2]]
cli.run(ns["main"])
"""


def test_script_workdir_metrics_json_holds_the_printed_rows(tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir, out = tmp_path / "cell", tmp_path / "out.json"
  proc = subprocess.run([sys.executable, "-c", _DRIVER, str(workdir), str(out)], cwd=repo,
                        timeout=120, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  printed = [line.split(" | ") for line in proc.stdout.splitlines()
             if line.startswith("| batched") or line.startswith("| torch")]
  with open(workdir / "metrics.json", encoding="utf-8") as f:
    metrics = json.load(f)
  with open(out, encoding="utf-8") as f:
    assert json.load(f) == metrics
  rows = metrics["rows"]
  assert len(printed) == len(rows) == 6
  for p, r in zip(printed, rows):   # server, concurrency, ok, req/s, p50, p95 as printed
    assert p[0] == "| " + r["server"] and p[1:4] == [str(r["concurrency"]), str(r["ok"]),
                                                      f"{r['throughput_rps']:.1f}"]
    assert p[5] == f"{r['p95_ms']:.0f}"
  # tables/serving.py's c=32 column: rows.2 is the first server's third level.
  assert (rows[2]["server"], rows[2]["concurrency"], rows[2]["throughput_rps"]) == (
      "batched", 32, 327.0)
  assert metrics["endpoint"] == "classify" and "--workdir=" + str(workdir) in metrics["flags"]


def test_model_alone_without_servers(tmp_path):
  # `--servers= --model_only`: only the model-alone rates (tables/serving_model.py's cells); an
  # empty --servers without --model_only measures nothing: a one-line error.
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  driver = _DRIVER.replace('g["_measure"] = measure', 'g["_measure"] = measure\n'
                           'g["_model_only"] = lambda bodies: {"one_per_call": 100.0, '
                           '"batched_split": 150.0, "batched_padded": 90.0}')
  driver = driver.replace('"--servers=batched,torch",', 'sys.argv[3], *sys.argv[4:],')
  run = lambda *flags: subprocess.run(
      [sys.executable, "-c", driver, str(tmp_path / "cell"), str(tmp_path / "o.json"), *flags],
      cwd=repo, timeout=120, capture_output=True, text=True, check=False)
  proc = run("--servers=", "--model_only")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "cell" / "metrics.json", encoding="utf-8") as f:
    metrics = json.load(f)
  assert metrics["rows"] == [] and metrics["model_only"]["batched_split"] == 150.0
  assert "batched_split 150.0 (1.50x)" in proc.stdout
  bad = run("--servers=")
  assert bad.returncode == 2 and "nothing to measure" in bad.stderr
  assert "Traceback" not in bad.stderr
