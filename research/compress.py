"""Compress a fine-tuned model: int8 post-training quantisation, head / FFN-neuron pruning or
unstructured pruning into a model directory, and a table row comparing it with the float32
source (size, CPU speed, dev/test metric).

  ./run.sh compress --config=configs/compress.py:sst2 --model=workdirs/sst2 --out=/tmp/sst2_int8
  .venv/bin/python research/compress.py --config=configs/compress.py:quick --method=int8_w8a8 \
      --model=/tmp/d13/teacher_sst2 --out=/tmp/sst2_int8

--model: any model source with a head (a fine-tuning run workdir, our model dir, an HF dir).
--out: the compressed model directory (model.json + params/ with int8 kernels and their
`kernel_scale`s, or smaller attention / FFN matrices and `heads_per_layer` / `mlp_per_layer`);
any research script loads it like another model dir (e.g. research/finetune.py
--config.model.init_from=<out> to recover a pruned model by fine-tuning). Also written there:
compress.json (the table rows) and metrics.json (the compressed model's dev/test and its row:
lib/compress.metrics; a sparse run's metrics.json gains that row). qat: the fine-tuning run is
<out>_qat_run; sparse: --out is the fine-tuning run. The table is printed as Markdown.
"""

import json
import os
import sys
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lib import atomic, cli, errors  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/compress.py", "configs/compress.py[:variant]",
                                lock_config=True)
flags.DEFINE_string("model", None, "the fine-tuned source model (workdir, model dir, HF dir)")
flags.DEFINE_string("out", None, "the compressed model directory to write")
flags.DEFINE_enum("method", "", ["", "int8_w8a8", "int8_weight_only", "int8_static", "heads",
                                 "neurons", "structured", "sparse", "qat"],
                  "overrides config.method")
flags.DEFINE_bool("overwrite", False, "replace a non-empty --out")
flags.DEFINE_string("workdir", None, "the same as --out (the flag declared tables pass)")
flags.mark_flags_as_required(["model"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # pylint: disable-next=g-import-not-at-top  # jax after flag parsing
  from lib import compress, models
  cfg = FLAGS.config
  method = FLAGS.method or cfg.method
  if bool(FLAGS.out) == bool(FLAGS.workdir):
    raise errors.ConfigError("give one of --out and --workdir (the output directory)")
  FLAGS.out = FLAGS.out or FLAGS.workdir
  if os.path.abspath(FLAGS.out) == os.path.abspath(FLAGS.model.split("@")[0]):
    raise errors.ConfigError(f"--out={FLAGS.out}: the same directory as --model")
  if method == "sparse":
    return _sparse(compress, cfg)
  if method in ("heads", "neurons", "structured"):   # structured: both, by their fractions
    fractions = dict(heads=cfg.heads.fraction * (method != "neurons"),
                     neurons=cfg.neurons.fraction * (method != "heads"))
    src = compress.prune_structured_source(
        FLAGS.model, FLAGS.out, cfg.eval, min_heads=cfg.heads.min_per_layer,
        min_neurons=cfg.neurons.min_per_layer, max_batches=cfg.heads.max_batches,
        overwrite=FLAGS.overwrite, **fractions)
    method = "+".join(f"{u}-{round(100 * f)}%" for u, f in fractions.items() if f)
  else:
    source = FLAGS.model
    if method == "qat":   # fine-tune with fake quantisation first; its result is quantised
      source = compress.qat_finetune(cfg.eval, FLAGS.out + "_qat_run", FLAGS.model, cfg.kernels)
      if not source:
        return   # preempted: rerun to resume
    calibration = () if method != "int8_static" else compress.calibration_batches(
        cfg.eval, FLAGS.model, cfg.calibration_batches)
    src = compress.quantize_source(source, FLAGS.out, "int8_w8a8" if method == "qat" else method,
                                   cfg.kernels, calibration=calibration, overwrite=FLAGS.overwrite)
  q = models.build(compress.model_io.describe(FLAGS.out), src.head, src.num_labels)
  qparams = compress.quant.as_int8(
      compress.model_io.load_model(FLAGS.out, src.head, src.num_labels).params,
      q.args.dot_general)
  module = models.build(src.args, src.head, src.num_labels)
  logging.info("timing float32 and %s (batch 1 and %d x %d)", method, cfg.speed.batch,
               cfg.speed.seq_len)
  timing = compress.speed({"float32": (module, src.params), method: (q, qparams)},
                          vocab=src.args.vocab_size, **cfg.speed)
  scores = {}
  if cfg.evaluate:
    scores = {"float32": compress.evaluate(cfg.eval, FLAGS.model),
              method: compress.evaluate(cfg.eval, FLAGS.out)}
  metric = "accuracy" if src.head == "seq_cls" else "f1"
  sizes = {"float32": _float_bytes(compress, src),
           method: compress.dir_bytes(os.path.join(FLAGS.out, "params"))}
  counts = {"float32": models.param_count(src.params), method: compress.weight_count(qparams)}
  rows = [compress.row(name, counts[name], sizes[name], timing[name],
                       timing["float32"], scores.get(name), scores.get("float32"), metric)
          for name in ("float32", method)]
  atomic.write_bytes(os.path.join(FLAGS.out, "compress.json"),
                     json.dumps(dict(rows=rows, metric=metric, source=FLAGS.model,
                                     eval_examples=cfg.eval.data.max_eval_examples,
                                     speed=cfg.speed.to_dict()), indent=1).encode())
  _write_metrics(compress.metrics(rows, metric))
  print(compress.format_rows(rows))


def _write_metrics(out: dict) -> None:
  """<out>/metrics.json, last (a declared table's cell is finished when it exists); a sparse
  run's own metrics.json (the fine-tuning run's) keeps its fields and gains `compress`."""
  path = os.path.join(FLAGS.out, "metrics.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      out = dict(json.load(f), compress=out["compress"])
  atomic.write_bytes(path, json.dumps(out, indent=1).encode())


def _sparse(compress, cfg):
  """Fine-tunes --model with unstructured pruning into the run workdir --out; one row each for
  the source (evaluated when config.evaluate) and the sparse model (dense speed: not timed)."""
  out = compress.sparse_finetune(cfg.eval, FLAGS.out, FLAGS.model, cfg.sparsity)
  if not out:
    return   # preempted: rerun to resume
  head, num_labels, _ = compress.model_io.head_of(FLAGS.model)
  src = compress.model_io.load_model(FLAGS.model, head, num_labels)
  metric = "f1" if cfg.eval.task == "ner" else "accuracy"   # --model may have no head (minilm)
  base = compress.evaluate(cfg.eval, FLAGS.model) if cfg.evaluate else None
  sb = out["sparse_bytes"]
  n = compress.models.param_count(src.params)
  name = f"{cfg.sparsity.method}-{round(100 * cfg.sparsity.target)}%"
  rows = [compress.row("float32", n, _float_bytes(compress, src), None, None, base, base, metric),
          compress.row(name, n - round(out["sparsity"]["total"] * sb["pruned_dense"] / 4),
                       sb["sparse_npz"] + sb["others"], None, None,
                       {s: out[s] for s in ("dev", "test")}, base, metric)]
  atomic.write_bytes(os.path.join(FLAGS.out, "compress.json"),
                     json.dumps(dict(rows=rows, metric=metric, source=FLAGS.model,
                                     sparsity=out["sparsity"], sparse_bytes=sb), indent=1).encode())
  _write_metrics(compress.metrics(rows, metric))
  print(compress.format_rows(rows))


def _float_bytes(compress, src) -> int:
  """The float source's params/ size when saved the way --out is (a run workdir's checkpoints
  also hold optimizer state, so they are not comparable)."""
  with tempfile.TemporaryDirectory(prefix="compress-float-") as tmp:
    out = os.path.join(tmp, "float32")
    compress.model_io.save_model_dir(out, src.args, src.params, src.head, src.num_labels)
    return compress.dir_bytes(os.path.join(out, "params"))


if __name__ == "__main__":
  cli.run(main)
