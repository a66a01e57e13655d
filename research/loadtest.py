"""Load test of research/serve.py: throughput and p50/p95/p99 latency at several concurrencies,
the batched server vs the same server with batching off (--max_batch=1) vs a Hugging Face PyTorch
pipeline behind the same HTTP API (--backend=torch). Loopback only; bounded in requests and time.

  ./run.sh loadtest --model=workdirs/sst2                       # /v1/classify, SST-2 dev texts
  ./run.sh loadtest --model=workdirs/ner --servers=batched,unbatched --requests=300
  ./run.sh loadtest --model=/tmp/sst2 --concurrency=1,8,32 --out=/tmp/loadtest.json
  ./run.sh loadtest --model=workdirs/sst2 --servers=batched --workdir=/tmp/lt  # metrics.json

Each server is started alone (a subprocess on a free 127.0.0.1 port), warmed up, then loaded at
each --concurrency with closed-loop clients (each sends its next request when answered) for at
most --requests requests or --max_seconds seconds; every request carries --texts_per_request
texts from the dataset's validation split. After the levels the server's /readyz reports XLA
compilations since warm-up and /metrics the mean units per model call. The load generator shares
the CPU with the server: say which CPU (printed) beside the numbers.
"""

import json
import os
import sys

from absl import flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from lib import cli, errors  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "model source served (a seq_cls or token_cls model)")
flags.DEFINE_list("servers", ["batched", "unbatched", "torch"], "batched | unbatched | torch "
                  "(none, `--servers=`, with --model_only: the model alone)")
flags.DEFINE_list("concurrency", ["1", "8", "32"], "requests in flight, one level each")
flags.DEFINE_integer("requests", 200, "requests per level at most")
flags.DEFINE_float("max_seconds", 60.0, "seconds per level at most")
flags.DEFINE_integer("warmup_requests", 16, "requests sent (at concurrency 8) before measuring")
flags.DEFINE_integer("texts_per_request", 1, "texts in each request")
flags.DEFINE_string("texts", "", "dataset whose validation texts are sent (default: sst2 for "
                    "classification, conll2003 for NER)")
flags.DEFINE_integer("max_batch", 32, "batched server: units per model call")
flags.DEFINE_float("max_wait_ms", 5.0, "batched server: max queue delay")
flags.DEFINE_integer("call_overhead_tokens", 128, "batched server: see research/serve.py")
flags.DEFINE_list("length_buckets", ["16", "32", "64", "128"], "padded lengths compiled")
flags.DEFINE_integer("torch_threads", 0, "torch server: intra-op threads (0 = torch's default)")
flags.DEFINE_string("server_logs", "/tmp", "directory of each server's log (loadtest_<server>.log)")
flags.DEFINE_bool("model_only", False, "also time the model alone (no HTTP) on 512 texts: one "
                  "per call vs batches of --max_batch split by length vs padded batches (the "
                  "most batching can gain here)")
flags.DEFINE_string("out", "", "write the results as JSON here too (atomically)")
flags.DEFINE_string("workdir", "", "a directory for the results as metrics.json (the same JSON as "
                    "--out: what tables/serving.py reads) and the servers' logs")
flags.DEFINE_string("data_dir", common.DATA_DIR, "shared data folder")
flags.mark_flags_as_required(["model"])

ENDPOINTS = {"seq_cls": ("classify", "sst2"), "token_cls": ("ner", "conll2003")}


def _server_flags(kind: str) -> list:
  base = [f"--model={FLAGS.model}", f"--data_dir={FLAGS.data_dir}",
          f"--length_buckets={','.join(FLAGS.length_buckets)}"]
  if kind == "batched":
    return base + [f"--max_batch={FLAGS.max_batch}", f"--max_wait_ms={FLAGS.max_wait_ms}",
                   f"--call_overhead_tokens={FLAGS.call_overhead_tokens}"]
  if kind == "unbatched":
    return base + ["--max_batch=1", "--max_wait_ms=0"]
  return base + ["--backend=torch", f"--torch_threads={FLAGS.torch_threads}"]


def _bodies(dataset: str) -> list:
  from lib import data  # pylint: disable=g-import-not-at-top
  inputs, _ = data.read_gold(dict(dataset=dataset, data_dir=FLAGS.data_dir), "validation")
  texts = [" ".join(x) if isinstance(x, list) else x for x in inputs]
  k = FLAGS.texts_per_request
  return [{"texts": texts[i:i + k]} for i in range(0, len(texts) - k + 1, k)]


def _measure(kind: str, path: str, bodies: list, levels: list) -> list:
  import httpx  # pylint: disable=g-import-not-at-top
  from lib.serving import loadtest as L  # pylint: disable=g-import-not-at-top
  logs = FLAGS.workdir if FLAGS.workdir and not FLAGS["server_logs"].present else FLAGS.server_logs
  log = os.path.join(logs, f"loadtest_{kind}.log")
  with L.ServerProcess(_server_flags(kind), log) as srv:
    logging.info("%s server ready after %.0f s (log %s)", kind, srv.ready_s, log)
    L.run_level(srv.url, path, bodies, 8, FLAGS.warmup_requests, FLAGS.max_seconds)
    rows = []
    for c in levels:
      metrics = httpx.get(srv.url + "/metrics").text
      batches0 = L.scrape(metrics, "serve_batch_size_count")
      units0 = L.scrape(metrics, "serve_batch_size_sum")
      row = L.run_level(srv.url, path, bodies, c, FLAGS.requests, FLAGS.max_seconds).row()
      metrics = httpx.get(srv.url + "/metrics").text
      calls = L.scrape(metrics, "serve_batch_size_count") - batches0
      row.update(server=kind, mean_batch=(L.scrape(metrics, "serve_batch_size_sum") - units0)
                 / max(calls, 1))
      rows.append(row)
      logging.info("%s", row)
    ready = httpx.get(srv.url + "/readyz").json()
    for row in rows:
      row["compilations_after_warmup"] = ready.get("compilations_after_warmup")
  return rows


def main(argv):
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments: {argv[1:]}")
  from lib import atomic, model_io  # pylint: disable=g-import-not-at-top
  from lib.serving import loadtest as L  # pylint: disable=g-import-not-at-top
  head = model_io.head_of(FLAGS.model)[0]
  if head not in ENDPOINTS:
    raise errors.ConfigError(f"--model={FLAGS.model}: head {head!r}; the load test serves "
                             f"{sorted(ENDPOINTS)} models")
  unknown = sorted(set(FLAGS.servers) - {"batched", "unbatched", "torch"})
  if unknown:
    raise errors.ConfigError(f"--servers: unknown {unknown}; valid: batched, unbatched, torch")
  if not FLAGS.servers and not FLAGS.model_only:
    raise errors.ConfigError("--servers is empty and --model_only is off: nothing to measure")
  try:
    levels = [int(c) for c in FLAGS.concurrency]
  except ValueError:
    raise errors.ConfigError(f"--concurrency={FLAGS.concurrency}: expected integers") from None
  endpoint, dataset = ENDPOINTS[head]
  if FLAGS.workdir:
    os.makedirs(FLAGS.workdir, exist_ok=True)   # the servers' logs go there
  bodies = _bodies(FLAGS.texts or dataset)
  rows = []
  for kind in FLAGS.servers:
    rows += _measure(kind, f"/v1/{endpoint}", bodies, levels)
  bound = _model_only(bodies) if FLAGS.model_only else None
  cpu = L.cpu_description()
  print(f"\n{FLAGS.model} /v1/{endpoint}, {FLAGS.texts_per_request} text(s) per request, "
        f"{len(bodies)} distinct bodies; CPU: {cpu}\n")
  if rows:
    print(L.results_table(rows))
  if bound:
    print("\nmodel alone, texts/s: " + ", ".join(f"{k} {v:.1f} ({v / bound['one_per_call']:.2f}x)"
                                                 for k, v in bound.items()))
  results = json.dumps(dict(model=FLAGS.model, endpoint=endpoint, cpu=cpu, flags=sys.argv[1:],
                            rows=rows, model_only=bound), indent=2).encode()
  for path in ([FLAGS.out] if FLAGS.out else []) + (
      [os.path.join(FLAGS.workdir, "metrics.json")] if FLAGS.workdir else []):
    atomic.write_bytes(path, results)


def _model_only(bodies: list) -> dict:
  """lib.serving.loadtest.model_only_rates on the first 512 texts."""
  from lib.serving import batcher as B, loadtest as L  # pylint: disable=g-import-not-at-top
  lim = B.BatchLimits(max_batch=FLAGS.max_batch, max_wait_ms=0,
                      length_buckets=tuple(int(b) for b in FLAGS.length_buckets),
                      call_overhead_tokens=FLAGS.call_overhead_tokens)
  return L.model_only_rates(FLAGS.model, FLAGS.data_dir, lim,
                            [t for b in bodies for t in b["texts"]][:512])


if __name__ == "__main__":
  cli.run(main)
