"""Input-pipeline throughput: examples/s and tokens/s of each default pipeline alone, and its padding.

  .venv/bin/python research/data_benchmark.py [--batches=300] [--data_cache=DIR]

Prints one row per pipeline: preparation time (TFDS build + tokenisation, or cache load), examples/s and
real (non-padding) tokens/s while iterating, the padding fraction over one epoch / pass, and the ratio to
the training step's consumption (--train_examples_per_s, MiniLM fine-tuning on this CPU: ~100-300/s).
"""

import os
import sys
import time

from absl import flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lib import cli, data, hf  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", data.DEFAULT_DATA_DIR, "shared data folder")
flags.DEFINE_string("data_cache", None, "prepared-data cache (default ~/.cache/workbench_data)")
flags.DEFINE_string("model_dir", "minilm", "BERT tokenizer dir ('minilm' = the installed MiniLM)")
flags.DEFINE_integer("batches", 300, "batches timed per pipeline")
flags.DEFINE_float("train_examples_per_s", 300.0, "training step consumption to compare with")

# name, dataset, split, tokenizer kind, make_batches keywords
PIPELINES = [
    ("conll2003 train", "conll2003", "train", "bert", dict(batch_size=32, max_len=128, train=True)),
    ("conll2003 validation", "conll2003", "validation", "bert", dict(batch_size=32, max_len=128)),
    ("sst2 train", "sst2", "train", "bert", dict(batch_size=32, max_len=66, train=True)),
    ("mlm text:brown rows", "text:brown", "train", "bert", dict(batch_size=32, max_len=128, train=True)),
    ("mlm text:sst2 rows wwm", "text:sst2", "train", "bert",
     dict(batch_size=32, max_len=128, train=True, whole_word_masking=True)),
    ("clm text:shakespeare rows", "text:shakespeare", "train", "gpt2", dict(batch_size=32, max_len=128, train=True)),
]


def bench(it, n):
  """(examples/s, real tokens/s) over n batches (or one pass for evaluation iterators)."""
  examples = tokens = 0
  t0 = time.perf_counter()
  for i, batch in enumerate(it):
    rows = batch["example_ids"] >= 0 if "example_ids" in batch else batch["input_mask"].any(1)
    examples += int(rows.sum())
    tokens += int(batch["input_mask"].sum())
    if i + 1 >= n:
      break
  dt = time.perf_counter() - t0
  return examples / dt, tokens / dt


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # keep the table readable (tfds logs every dataset_info load)
  toks = {"bert": hf.load_bert_tokenizer(FLAGS.model_dir),
          "gpt2": hf.load_gpt2_tokenizer(os.path.join(FLAGS.data_dir, "gpt2-bpe"))}
  header = f"{'pipeline':28s} {'prep s':>7s} {'examples/s':>11s} {'tokens/s':>11s} {'padding':>8s} {'x train':>8s}"
  print(header)
  print("-" * len(header))
  for name, dataset, split, kind, kw in PIPELINES:
    t0 = time.perf_counter()
    it = data.make_batches(dataset, split, toks[kind], data_dir=FLAGS.data_dir, cache_dir=FLAGS.data_cache, **kw)
    prep = time.perf_counter() - t0
    pad = data.padding_stats(it)["padding_fraction"]
    ex_s, tok_s = bench(it, FLAGS.batches)
    print(f"{name:28s} {prep:7.2f} {ex_s:11,.0f} {tok_s:11,.0f} {pad:8.1%} {ex_s / FLAGS.train_examples_per_s:7.0f}x")
  print(f"\ntraining step consumption for reference: {FLAGS.train_examples_per_s:,.0f} examples/s "
        "(--train_examples_per_s); padding = padded tokens / all tokens over one epoch or pass")


if __name__ == "__main__":
  cli.run(main)
