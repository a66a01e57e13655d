"""Load test of the server (research/loadtest.py): requests/s and p95 latency at 1, 8 and 32
closed-loop clients, the batched server vs the same server unbatched (--max_batch=1) vs a Hugging
Face PyTorch pipeline behind the same HTTP API, on SST-2 classification and CoNLL-2003 NER. Each
load-test cell serves the model cell of its task; seeds are repeats (the load test has no seed).

  ./run.sh reproduce --table=tables/serving --rows=sst2_model,sst2_batched,sst2_unbatched
  ./run.sh reproduce --table=tables/serving --emit=commands

Run the load-test cells on a quiet machine, one at a time: the clients share the CPU with the
server, so other jobs change every number. Setting: one text per request, the tasks' validation
texts; at most 400 requests or 30 s per level; the models are MiniLM fine-tuned briefly
(`:quick`, 1,000 examples), which does not matter for speed. Claims: at each task, the unbatched
server and the PyTorch pipeline vs the batched server (Δ = row - batched, c=32 requests/s).
"""

from lib import tables

REPEATS = (0, 1, 2)
LEVELS = ("--concurrency=1,8,32", "--requests=400", "--max_seconds=30")
SERVERS = {"batched": "batched (max_batch 32, 5 ms)", "unbatched": "unbatched (max_batch 1)",
           "torch": "HF PyTorch pipeline"}
COMPILED = "rows.2.compilations_after_warmup"
C1, C1P, C8, C8P, C32, C32P = ("rows.0.throughput_rps", "rows.0.p95_ms", "rows.1.throughput_rps",
                               "rows.1.p95_ms", "rows.2.throughput_rps", "rows.2.p95_ms")
TABLE_RUN = ("README 'Serving and export' at commit 37fa3b9: `./run.sh loadtest --model=<model> "
             "--concurrency=1,8,32 --requests=400 --max_seconds=30` (the three servers in one "
             "run), AMD EPYC, 2 cores, quiet machine (load ~2), 2026-11-30; 0 5xx responses and 0 "
             "compilations after warm-up in every row")
REPEAT_RUN = ("README 'Serving and export' at commit 37fa3b9: a repeat after the batched server "
              "stopped waiting for company when no other request is open (c=1 and c=32 only)")
FIX_NOTE = ("seed 0's batched c=1 (SST-2 51.6 req/s, NER 59.5) is not recorded: it predates the "
            "fix that stopped the 5 ms wait for company when no other request is open")
# (task, server): ({column: value} of the README table, {column: value} of the repeat)
BEFORE = {
    ("sst2", "batched"): ({C1P: 28, C8: 95.1, C8P: 113, C32: 120.7, C32P: 398},
                          {C1: 75.1, C32: 120.4}),
    ("sst2", "unbatched"): ({C1: 83.8, C1P: 17, C8: 90.3, C8P: 106, C32: 81.9, C32P: 455},
                            {C32: 87.6}),
    ("sst2", "torch"): ({C1: 58.5, C1P: 25, C8: 65.8, C8P: 157, C32: 68.0, C32P: 519}, {}),
    ("ner", "batched"): ({C1P: 25, C8: 134.0, C8P: 89, C32: 149.3, C32P: 365},
                         {C1: 77.5, C32: 116.6}),
    ("ner", "unbatched"): ({C1: 99.9, C1P: 17, C8: 101.2, C8P: 110, C32: 102.9, C32P: 367},
                           {C32: 90.6}),
    ("ner", "torch"): ({C1: 58.5, C1P: 28, C8: 61.9, C8P: 165, C32: 59.8, C32P: 624}, {}),
}


def _recorded(task: str, server: str) -> tables.Recorded:
  first, repeat = BEFORE[(task, server)]
  values = {c: {0: v} for c, v in first.items()}
  for c, v in repeat.items():
    values.setdefault(c, {})[1] = v
  if server != "torch":   # the torch pipeline compiles nothing
    values[COMPILED] = {0: 0}
  return tables.Recorded(values, TABLE_RUN + ("; seed 1: " + REPEAT_RUN if repeat else ""))


def _rows(task: str) -> tuple:
  model = f"{task}_model"
  out = [tables.Row(model, f"{task}: the served model (MiniLM, `:quick`)",
                    f"configs/{task}.py:quick")]
  for server, label in SERVERS.items():
    out.append(tables.Row(
        f"{task}_{server}", f"{'SST-2 classify' if task == 'sst2' else 'NER'}, {label}",
        script="research/loadtest.py", seed_flag="", seeds=REPEATS, claim=True,
        args=(f"--model={{workdir:{model}}}", f"--servers={server}") + LEVELS,
        vs="" if server == "batched" else f"{task}_batched", recorded=_recorded(task, server),
        note=FIX_NOTE if server == "batched" else ""))
  return tuple(out)


TABLE = tables.Table(
    name="serving",
    title="Load test on 2 CPU cores: batched vs unbatched server vs a PyTorch pipeline "
          "(requests/s and p95 ms at 1, 8, 32 clients)",
    columns=(tables.Column(C32, "c=32 req/s", digits=1),
             tables.Column(C32P, "c=32 p95 ms", digits=0),
             tables.Column(C1, "c=1 req/s", digits=1), tables.Column(C1P, "c=1 p95 ms", digits=0),
             tables.Column(C8, "c=8 req/s", digits=1), tables.Column(C8P, "c=8 p95 ms", digits=0),
             tables.Column(COMPILED, "compilations after warm-up", digits=0),
             tables.Column("test.accuracy|test.f1", "model rows: test acc / F1", digits=4)),
    rows=_rows("sst2") + _rows("ner"),
    setting="closed-loop clients on the same 2 cores as the server (AMD EPYC), loopback HTTP, "
            "one text per request; run-to-run noise ~15% (the repeats).",
)
