"""Compressing MiniLM fine-tuned on SST-2 (issue 14): int8 static PTQ, QAT, structured pruning of
attention heads and FFN neurons (with and without a recovery epoch) and unstructured pruning,
each against the float32 source or the dense control: size, speed, dev/test accuracy.

  ./run.sh reproduce --table=tables/compress --rows=source,static      # ~10 min on 2 idle cores
  ./run.sh reproduce --table=tables/compress --emit=commands

Setting (configs/compress.py's measured rows): the source is MiniLM-L6 fine-tuned on SST-2's
first 2,000 training sentences for 1 epoch (the `source` row: the same cell as
tables/compress_sst2.py's); the post-training rows compress it; `*_recovery` fine-tune the
pruned model 1 more epoch on the same sentences, QAT fine-tunes the source 1 epoch with
fake-quantised matmuls, and the dense control is the source + 1 float epoch: the fair reference
for those (2 epochs in all); magnitude/movement pruning fine-tune the source 2 epochs (the same
cells as tables/compress_sst2.py). Full dev (872) and test (1,821) sets. Speed: 32 x 128
sequences/s against the float32 source in the same process; batch-1 latency beside it. Δ: test
accuracy minus the compared row's (the source for post-training rows, the dense control for the
rest). One seed: rows marked as such.
"""

from lib import tables

SUB = ("--config.data.max_train_examples=2000",)
TEST, DEV = "test.accuracy", "dev.accuracy"
SIZE, SPEED, B1, B1_FLOAT, PARAMS = ("compress.file_MB", "compress.speedup", "compress.b1_ms",
                                     "compress.float32.b1_ms", "compress.params")
BEFORE = ("README 'Compression' at commit 37fa3b9 and configs/compress.py's docstring (issue 14, "
          "rounds 1-3): source /tmp/d13/teacher_sst2 (research/finetune.py on the first 2,000 "
          "SST-2 sentences, 1 epoch, as the `source` row, but its own evaluation on 400 "
          "sentences), every row scored on the full dev/test sets, seed 0, AMD EPYC, 2 "
          "cores shared at load ~9-10, 2026-11-30")
# row id: measured before (test, dev, MB, speedup, batch-1 ms, float32 batch-1 ms, params)
RECORDED = {
    "source": (0.7661, 0.7511, 83.4, 1.0, None, None, None),
    "dense": (0.8199, 0.7878, 83.4, 1.0, None, None, None),
    "static": (0.7738, 0.7523, 53.7, 1.79, 44.5, 59.2, None),
    "heads30": (0.7501, 0.7466, 79.4, 1.24, 45.0, 51.7, 21.63e6),
    "heads30_recovery": (0.8155, 0.7924, None, None, None, None, None),
    "neurons30": (0.7705, 0.7477, 75.6, 1.10, 49.2, 61.2, 20.59e6),
    "neurons30_recovery": (0.8138, 0.7844, None, None, None, None, None),
    "heads30_neurons30": (0.7507, 0.7397, 71.6, 1.29, 68.9, 92.0, 19.50e6),
    "heads30_neurons30_recovery": (0.8160, 0.7959, None, None, None, None, None),
    "qat": (0.8199, 0.7867, 53.7, 1.16, None, None, None),
    "magnitude_70": (0.7743, 0.7672, 62.5, None, None, None, None),
    "movement_70": (0.4964, 0.5092, 62.5, None, None, None, None),
}


def _recorded(rid: str) -> tables.Recorded:
  cols = (TEST, DEV, SIZE, SPEED, B1, B1_FLOAT, PARAMS)
  return tables.Recorded({c: {0: v} for c, v in zip(cols, RECORDED[rid]) if v is not None},
                         BEFORE)


def _compressed(rid: str, label: str, variant: str, vs: str, args=("--overwrite",)):
  """A research/compress.py cell from the source (--overwrite: a crashed cell's directory holds
  cell.json; a finished one, with metrics.json, is never replaced)."""
  return tables.Row(rid, label, f"configs/compress.py:{variant}", script="research/compress.py",
                    args=("--model={workdir:source}",) + args, seed_flag="--config.eval.seed",
                    claim=True, vs=vs, recorded=_recorded(rid))


def _recovery(pruned: str, label: str) -> tables.Row:
  return tables.Row(f"{pruned}_recovery", label, "configs/sst2.py",
                    args=SUB + (f"--config.model.init_from={{workdir:{pruned}}}",), claim=True,
                    vs="dense", recorded=_recorded(f"{pruned}_recovery"),
                    note="size and speed: the pruned model's (the row above)")


SPARSE = ("--config.evaluate=False",)   # as tables/compress_sst2.py: the same cells
TABLE = tables.Table(
    name="compress",
    title="Compressing MiniLM-L6 fine-tuned on SST-2 (2,000 sentences): size, CPU speed, accuracy",
    columns=(tables.Column(TEST, "test acc"), tables.Column(DEV, "dev acc"),
             tables.Column(SIZE, "params/ MB", digits=1),
             tables.Column(SPEED, "32 x 128 speed vs float32", digits=2),
             tables.Column(B1, "batch-1 ms", digits=1),
             tables.Column(B1_FLOAT, "float32 batch-1 ms (same process)", digits=1),
             tables.Column(PARAMS, "params (M)", digits=2, scale=1e-6)),
    rows=(
        tables.Row("source", "float32 source (1 epoch)", "configs/sst2.py", args=SUB,
                   recorded=_recorded("source")),
        tables.Row("dense", "dense control: source + 1 float epoch", "configs/sst2.py",
                   args=SUB + ("--config.model.init_from={workdir:source}",),
                   recorded=_recorded("dense")),
        _compressed("static", "int8 static PTQ (16 calibration batches)", "static", "source"),
        _compressed("heads30", "30% of heads removed (22 of 72)", "heads30", "source"),
        _recovery("heads30", "... + 1 recovery epoch"),
        _compressed("neurons30", "30% of FFN neurons removed", "neurons30", "source"),
        _recovery("neurons30", "... + 1 recovery epoch"),
        _compressed("heads30_neurons30", "30% of heads + 30% of neurons", "heads30+neurons30",
                    "source"),
        _recovery("heads30_neurons30", "... + 1 recovery epoch"),
        _compressed("qat", "QAT (1 epoch), then w8a8", "qat", "dense"),
        _compressed("magnitude_70", "magnitude pruning 70% (2 epochs; dense matmuls)",
                    "magnitude+s70", "dense", SPARSE),
        _compressed("movement_70", "movement pruning 70% (2 epochs; collapses to one class)",
                    "movement+s70", "dense", SPARSE),
    ),
    setting="MiniLM-L6 (not BERT-base), a 2,000-sentence 1-epoch source; one seed. The embedding "
            "table stays float32 (int8 models are 53.7 MB, not a quarter); unstructured pruning "
            "runs dense matmuls (no speedup); the HF export of pruned models pads removed heads "
            "and neurons with zeros.",
)
