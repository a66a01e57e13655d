"""The served model alone (no HTTP): texts/s through the serving engine's own model call, one
text per call vs batches of 32 split by length (the server's way) vs batches padded to their
longest text: the most batching can gain on this machine (research/loadtest.py --model_only).

  ./run.sh reproduce --table=tables/serving_model

Each cell times the model cell of tables/serving.py (the same command: the same workdir, run
once) on the task's first 512 validation texts, median of 3 interleaved passes per way. The
timing has no seed: "seeds" are repeats. Run it on a quiet machine: the rates are absolute.
"""

from lib import tables

ONCE = ("README 'Serving and export' at commit 985c0db: `./run.sh loadtest ... --model_only`, the "
        "SST-2 model, AMD EPYC, 2 cores, quiet machine, 2026-11-30 (measured once); shown as repeat "
        "2 until that cell runs")
ONE, SPLIT, PADDED = ("model_only.one_per_call", "model_only.batched_split",
                      "model_only.batched_padded")


def _rows(task: str, recorded=None) -> tuple:
  model = f"{task}_model"
  name = "SST-2 classify" if task == "sst2" else "NER (windows)"
  return (tables.Row(model, f"{task}: the served model (MiniLM, `:quick`)",
                     f"configs/{task}.py:quick"),
          tables.Row(f"{task}_alone", f"{name}, the model alone", script="research/loadtest.py",
                     args=(f"--model={{workdir:{model}}}", "--servers=", "--model_only"),
                     seed_flag="", seeds=(0, 1, 2), recorded=recorded))


TABLE = tables.Table(
    name="serving_model",
    title="The served model alone on 2 CPU cores: texts/s by way of batching (no HTTP)",
    columns=(tables.Column(ONE, "one text per call", digits=1),
             tables.Column(SPLIT, "batches of 32, split by length", digits=1),
             tables.Column(PADDED, "batches of 32, padded to the longest", digits=1),
             tables.Column("test.accuracy|test.f1", "model rows: test acc / F1", digits=4)),
    primary=SPLIT,
    rows=_rows("sst2", tables.Recorded({ONE: {2: 119.6}, SPLIT: {2: 168.2}, PADDED: {2: 96.7}},
                                       ONCE)) + _rows("ner"),
    setting="The jitted forward of the SST-2 / NER models of tables/serving.py, compiled for "
            "every (rows, length bucket) beforehand; AMD EPYC.",
)
