"""Load generation against a served model (loopback only): closed-loop clients at a concurrency,
bounded in requests and seconds; throughput, latency percentiles, status counts, batch sizes.

`run_level` keeps `concurrency` requests in flight (each client sends its next request when the
last is answered) until `requests` are sent or `max_seconds` pass; a request still unanswered
after `timeout_s` counts as an error. `ServerProcess` starts research/serve.py in a subprocess on
a free loopback port and waits for /readyz.
"""

import asyncio
import dataclasses
import ipaddress
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.parse
from typing import Optional, Sequence

import numpy as np

from lib import reporting

logging.getLogger("httpx").setLevel(logging.WARNING)    # not one INFO line per request
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def check_loopback(url: str) -> None:
  """Raises ValueError unless `url` names a loopback host (the load test never leaves the box)."""
  host = urllib.parse.urlparse(url).hostname or ""
  try:
    ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(f"{url}: the load test only targets loopback addresses (127.0.0.1, ::1, "
                     "localhost)")


def percentile(values: Sequence[float], q: float) -> float:
  """The q-th percentile (0..100) by linear interpolation (numpy's default); nan when empty."""
  return float(np.percentile(values, q)) if len(values) else float("nan")


@dataclasses.dataclass
class Level:
  """What one concurrency level measured."""
  concurrency: int
  sent: int
  ok: int
  status: dict          # HTTP status -> count ('error' for no answer)
  seconds: float
  latencies_ms: list

  def row(self) -> dict:
    lat = self.latencies_ms
    return dict(concurrency=self.concurrency, sent=self.sent, ok=self.ok,
                throughput_rps=self.ok / self.seconds if self.seconds else 0.0,
                p50_ms=percentile(lat, 50), p95_ms=percentile(lat, 95), p99_ms=percentile(lat, 99),
                errors_5xx=sum(n for s, n in self.status.items() if str(s).startswith("5")),
                errors_other=sum(n for s, n in self.status.items()
                                 if s != 200 and not str(s).startswith("5")))


async def _level(url, path, bodies, concurrency, requests, max_seconds, timeout_s, headers):
  import httpx  # pylint: disable=g-import-not-at-top
  status, lat, sent = {}, [], [0]
  deadline = time.perf_counter() + max_seconds
  limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
  async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits,
                               headers=headers) as client:
    async def worker():
      while sent[0] < requests and time.perf_counter() < deadline:
        body = bodies[sent[0] % len(bodies)]
        sent[0] += 1
        t0 = time.perf_counter()
        try:
          r = await client.post(path, json=body)
          code = r.status_code
        except httpx.HTTPError:
          code = "error"
        if code == 200:
          lat.append((time.perf_counter() - t0) * 1000)
        status[code] = status.get(code, 0) + 1
    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    seconds = time.perf_counter() - t0
  return Level(concurrency, sent[0], len(lat), status, seconds, lat)


def run_level(url: str, path: str, bodies: Sequence[dict], concurrency: int, requests: int,
              max_seconds: float, timeout_s: float = 60.0, headers: Optional[dict] = None) -> Level:
  """Sends up to `requests` POSTs of `bodies` (cycled) to url+path, `concurrency` at a time."""
  check_loopback(url)
  return asyncio.run(_level(url, path, list(bodies), concurrency, requests, max_seconds,
                            timeout_s, headers or {}))


def scrape(text: str, name: str) -> float:
  """The sum of a Prometheus sample `name` over its label sets in an exposition `text`."""
  total = 0.0
  for line in text.splitlines():
    if line.startswith(name + " ") or line.startswith(name + "{"):
      total += float(line.rsplit(" ", 1)[1])
  return total


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class ServerProcess:
  """research/serve.py in a subprocess on a free loopback port; a context manager that stops it
  (SIGTERM, then the process's graceful shutdown) on exit. Its log goes to `log_path`."""

  def __init__(self, flags: Sequence[str], log_path: str, ready_timeout_s: float = 900.0):
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.flags, self.log_path, self.ready_timeout_s = list(flags), log_path, ready_timeout_s
    self.proc = None

  def __enter__(self) -> "ServerProcess":
    import httpx  # pylint: disable=g-import-not-at-top
    cmd = [sys.executable, os.path.join(ROOT, "research", "serve.py"), "--host=127.0.0.1",
           f"--port={self.port}"] + self.flags
    self.log = open(self.log_path, "w", encoding="utf-8")   # pylint: disable=consider-using-with
    self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
    t0 = time.time()
    while time.time() - t0 < self.ready_timeout_s:
      if self.proc.poll() is not None:
        raise RuntimeError(f"the server exited with {self.proc.returncode}; see {self.log_path}")
      try:
        if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
          self.ready_s = time.time() - t0
          return self
      except httpx.HTTPError:
        pass
      time.sleep(1.0)
    self.__exit__(None, None, None)
    raise TimeoutError(f"the server was not ready after {self.ready_timeout_s} s; see "
                       f"{self.log_path}")

  def __exit__(self, *exc) -> None:
    if self.proc is not None and self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(60)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self.log.close()


# ----------------------------------------------------------------------------- the model's bound

def results_table(rows: Sequence[dict]) -> str:
  """The load-test rows (run_level results per server and concurrency) as a Markdown table."""
  head = ("| server | concurrency | requests ok | req/s | p50 ms | p95 ms | p99 ms | 5xx | other "
          "errors | texts per model call | compilations after warm-up |")
  lines = [head, "|" + "---|" * 11]
  for r in rows:
    lines.append(f"| {r['server']} | {r['concurrency']} | {r['ok']} | {r['throughput_rps']:.1f} | "
                 f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors_5xx']} |"
                 f" {r['errors_other']} | {r['mean_batch']:.1f} | "
                 f"{r['compilations_after_warmup']} |")
  return "\n".join(lines)


def cpu_description() -> str:
  """This machine's CPU model, logical CPU count and load (for the printed results)."""
  return (f"{reporting.cpu_model()} x {os.cpu_count()} logical CPUs, load average "
          f"{os.getloadavg()[0]:.1f}")


MODEL_ONLY = ("one_per_call", "batched_split", "batched_padded")


def model_only_plans(lengths: Sequence[int], limits) -> dict:
  """{way: [[unit indices of one call], ...]} for the units of `lengths` taken in batches of
  limits.max_batch: one unit per call; each batch split by `batcher.plan_calls` (the server's
  way); each batch as one call padded to its longest unit."""
  from lib.serving import batcher  # pylint: disable=g-import-not-at-top
  n, size = len(lengths), limits.max_batch
  batches = [list(range(s, min(s + size, n))) for s in range(0, n, size)]
  split = [[b[k] for k in call] for b in batches
           for call in batcher.plan_calls([lengths[i] for i in b], limits)]
  return dict(one_per_call=[[i] for i in range(n)], batched_split=split, batched_padded=batches)


def model_only(run_batch, units: Sequence, limits, rounds: int = 3) -> dict:
  """Texts per second of the model alone (no HTTP), median of `rounds` interleaved passes per way
  of `model_only_plans`: what batching can gain on this machine at most.

  `run_batch(payloads, (rows, length))` is the engine's model call (shapes compiled beforehand).
  """
  lengths = [len(u) for u in units]
  plans = model_only_plans(lengths, limits)
  rates = {k: [] for k in plans}
  for _ in range(rounds):
    for way, calls in plans.items():
      t0 = time.perf_counter()
      for call in calls:
        run_batch([units[i] for i in call],
                  limits.padded_shape(len(call), max(lengths[i] for i in call)))
      rates[way].append(len(units) / (time.perf_counter() - t0))
  return {k: float(np.median(v)) for k, v in rates.items()}


def model_only_rates(source: str, data_dir: str, limits, texts: Sequence[str]) -> dict:
  """`model_only` for the model at `source` served with `limits` on `texts` (classify/embed: one
  unit per text; NER: its windows), through a warmed-up serving engine's own model call."""
  from lib import model_io  # pylint: disable=g-import-not-at-top
  from lib.serving import engine  # pylint: disable=g-import-not-at-top
  eng = engine.Engine(model_io.load_for_inference(source, data_dir=data_dir), limits)
  eng.warm_up()
  eng.batcher.stop()
  if "ner" in eng.endpoints:
    units = [w["input_ids"] for t in texts for w in eng.ner_units(t)[1]]
  else:
    units = eng.encode(texts)
  return model_only(eng._run_batch, units, limits)  # pylint: disable=protected-access
