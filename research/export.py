"""Export a model's predict function as a portable artifact: StableHLO (jax.export) or ONNX.

  ./run.sh export --model=workdirs/sst2 --format=stablehlo --out=/tmp/sst2_shlo
  ./run.sh export --model=workdirs/sst2 --format=onnx --int8 --eval_dataset=sst2 --out=/tmp/sst2_onnx
  ./run.sh export --model=minilm --format=onnx --out=/tmp/minilm_onnx      # embeddings only

Both artifacts take int32 (input_ids, input_mask) of any (batch, length <= max_len) and return
float32 `logits` (with a head) and `embedding` (BERT: mean-pooled, L2-normalised); the weights are
inside the file, so `lib.export.load(out)` runs it with jax or onnxruntime alone. Each artifact is
compared with JAX before the directory appears (float: max |diff| <= --tolerance, else nothing is
written). --int8 adds onnxruntime's dynamic int8 quantisation; with --eval_dataset (a sequence
classification dataset or own tsv:/csv:/jsonl: files) the float and int8 accuracies on
--eval_split are measured and written to export.json. The Hugging Face export stays in
research/convert.py (--to=hf).
"""

import json
import os
import sys
import time

from absl import flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from lib import cli, errors  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "model source: run workdir (@best/@latest/@<step>), our model "
                    "dir, a Hugging Face dir or 'minilm'")
flags.DEFINE_enum("format", None, ["stablehlo", "onnx"], "artifact format")
flags.DEFINE_bool("int8", False, "also write onnxruntime's dynamically int8-quantised ONNX file")
flags.DEFINE_string("out", None, "export directory (written atomically; an existing non-empty one "
                    "only with --overwrite)")
flags.DEFINE_bool("overwrite", False, "replace an existing non-empty --out (never a run's outputs)")
flags.DEFINE_float("tolerance", 1e-4, "largest |artifact - JAX| accepted on the check inputs")
flags.DEFINE_string("eval_dataset", "", "with --int8: a classification dataset (sst2, tsv:...) "
                    "whose --eval_split measures the float and int8 accuracy")
flags.DEFINE_string("eval_split", "test", "split of --eval_dataset")
flags.DEFINE_integer("max_eval_examples", 0, "first N examples of the split (0 = all)")
flags.DEFINE_string("tokenizer", "", "tokenizer location overriding the model's own")
flags.DEFINE_string("data_dir", common.DATA_DIR, "shared data folder")
flags.mark_flags_as_required(["model", "format", "out"])


def _accuracy(model, out):
  """Float vs int8 accuracy on the eval split (a classification model only)."""
  from lib import data, export  # pylint: disable=g-import-not-at-top
  if model.head != "seq_cls":
    raise errors.ConfigError(f"--eval_dataset: accuracy is measured for a sequence "
                             f"classification model; {FLAGS.model} has head {model.head!r}")
  texts, gold = data.read_gold(dict(dataset=FLAGS.eval_dataset, data_dir=FLAGS.data_dir,
                                    max_eval_examples=FLAGS.max_eval_examples), FLAGS.eval_split)
  unknown = sorted(set(gold) - set(model.label_names))
  if unknown:
    raise errors.ConfigError(f"--eval_dataset={FLAGS.eval_dataset}: labels {unknown[:5]} are "
                             f"not the model's {model.label_names}")
  fns = {"float32": export.load(out), "int8": export.load(out, int8=True)}
  t0 = time.time()
  res = export.classification_accuracy(fns, model.tokenizer, texts, gold, model.label_names,
                                       model.args.max_len)
  res.update(dataset=FLAGS.eval_dataset, split=FLAGS.eval_split, seconds=time.time() - t0,
             delta=res["accuracy"]["int8"] - res["accuracy"]["float32"])
  return res


def main(argv):
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.int8 and FLAGS.format != "onnx":
    raise errors.ConfigError("--int8 needs --format=onnx (onnxruntime quantises ONNX files)")
  if FLAGS.eval_dataset and not FLAGS.int8:
    raise errors.ConfigError("--eval_dataset measures the int8 accuracy delta: add --int8")
  from lib import export, model_io  # pylint: disable=g-import-not-at-top
  model = model_io.load_for_inference(FLAGS.model, data_dir=FLAGS.data_dir,
                                      tokenizer=FLAGS.tokenizer)
  source = model_io.split_source(FLAGS.model)[0]
  t0 = time.time()
  meta = export.write(model, FLAGS.out, FLAGS.format, int8=FLAGS.int8, overwrite=FLAGS.overwrite,
                      sources=[source] if os.path.isdir(source) else [], tol=FLAGS.tolerance)
  logging.info("exported %s (head %r) to %s in %.1f s", FLAGS.model, model.head, FLAGS.out,
               time.time() - t0)
  for key, diffs in meta["check"].items():
    print(f"{key:10s} {meta['bytes'][key] / 2**20:8.2f} MiB  max |diff| vs JAX: "
          + ", ".join(f"{k} {v:.2e}" for k, v in sorted(diffs.items())))
  if FLAGS.eval_dataset:
    meta["int8_accuracy"] = _accuracy(model, FLAGS.out)
    export.write_meta(FLAGS.out, meta)
    acc = meta["int8_accuracy"]
    print(f"{FLAGS.eval_dataset} {FLAGS.eval_split} ({acc['examples']} examples): accuracy "
          f"float32 {acc['accuracy']['float32']:.4f}, int8 {acc['accuracy']['int8']:.4f} "
          f"(delta {acc['delta']:+.4f}), argmax agreement {acc['agreement']['int8']:.4f}")
  print(json.dumps({k: meta[k] for k in ("format", "files", "head", "max_len")}))


if __name__ == "__main__":
  cli.run(main)
