"""Offline adversarial attacks on a trained model: character edits (DeepWordBug-style), word
substitution from the model's own embedding neighbours (TextFooler-style) and HotFlip, with a
TextAttack-style report (lib/attacks.py).

  ./run.sh attack --source=workdirs/sst2 --workdir=workdirs/sst2_attack --num_examples=300
  .venv/bin/python research/attack.py --source=workdirs/ner --dataset=conll2003 \
      --attacks=char,word --workdir=/tmp/ner_attack --seed=1

--source is any model source with a classification head (a run workdir means its reported
checkpoint; `@latest` / `@<step>` choose another). Writes to --workdir: metrics.json (the summary of
each attack, flags, source), attack_report.txt, attack_<name>_examples.txt (every attacked
example: original and perturbed text, changed words in [[ ]]). Existing outputs are kept unless
--overwrite.
"""

import json
import os
import sys
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lib import cli, errors  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("source", None, "model source with a seq_cls or token_cls head")
flags.DEFINE_string("workdir", None, "output folder")
flags.DEFINE_string("dataset", "", "sst2 | conll2003 | own data spec (default: by the head)")
flags.DEFINE_string("split", "test", "split attacked")
flags.DEFINE_integer("num_examples", 200, "the first N examples of the split (0 = all)")
flags.DEFINE_list("attacks", ["char", "word", "hotflip"], "attacks to run: char, word, hotflip")
flags.DEFINE_integer("seed", 0, "seed of the character edits")
flags.DEFINE_float("max_frac", 0.25, "budget: share of an input's words that may change (>= 1)")
flags.DEFINE_integer("neighbours", 20, "word attack: embedding neighbours tried per word")
flags.DEFINE_float("min_cos", 0.5, "word attack: cosine floor of a substitute to the word")
flags.DEFINE_integer("flips_tried", 5, "hotflip: best estimated swaps verified per step")
flags.DEFINE_integer("batch_size", 32, "inputs per forward pass")
flags.DEFINE_integer("show", 20, "examples shown in the report per attack")
flags.DEFINE_string("data_dir", None, "shared data folder (default: lib.data's)")
flags.DEFINE_bool("overwrite", False, "replace existing attack outputs in --workdir")
flags.mark_flags_as_required(["source", "workdir"])

DEFAULT_DATASET = {"seq_cls": "sst2", "token_cls": "conll2003"}


def load_examples(dataset, split, limit, label_names, data_dir):
  """[(words, gold index or tag indices)] of the split's first `limit` examples."""
  from lib import data  # pylint: disable=g-import-not-at-top
  inputs, gold = data.read_gold({"dataset": dataset, "dir": data_dir}, split)
  index = {n: i for i, n in enumerate(label_names)}
  unknown = sorted({g for gs in gold for g in (gs if isinstance(gs, list) else [gs])} - set(index))
  if unknown:
    raise errors.ConfigError(f"--dataset={dataset}: labels {unknown} are not the model's "
                             f"{label_names}")
  n = len(inputs) if not limit else min(limit, len(inputs))
  to_ids = lambda g: [index[t] for t in g] if isinstance(g, list) else index[g]
  return [(w if isinstance(w, list) else w.split(), to_ids(g))
          for w, g in zip(inputs[:n], gold[:n])]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from lib import atomic, attacks, data, model_io, reporting  # pylint: disable=g-import-not-at-top
  bad = sorted(set(FLAGS.attacks) - set(attacks.ATTACKS))
  if bad:
    raise errors.ConfigError(f"--attacks: unknown {bad}; valid: {list(attacks.ATTACKS)}")
  out_json = os.path.join(FLAGS.workdir, "metrics.json")   # as every script (tables/ read it)
  if os.path.exists(out_json) and not FLAGS.overwrite:
    raise atomic.OutputExistsError(f"{out_json} exists: pass --overwrite to replace it, or use "
                                   "another --workdir")
  data_dir = FLAGS.data_dir or data.DEFAULT_DATA_DIR
  m = model_io.load_for_inference(FLAGS.source, data_dir=data_dir)
  if m.head not in DEFAULT_DATASET:
    raise errors.ModelSourceError(f"--source={FLAGS.source}: head {m.head!r}; attacks need one of "
                                  f"{sorted(DEFAULT_DATASET)}")
  dataset = FLAGS.dataset or DEFAULT_DATASET[m.head]
  examples = load_examples(dataset, FLAGS.split, FLAGS.num_examples, m.label_names, data_dir)
  kind = "seq" if m.head == "seq_cls" else "token"
  victim = attacks.Victim(m.module, m.params, m.tokenizer, kind, FLAGS.batch_size)
  nb = attacks.Neighbours(m.params, m.args, m.tokenizer)
  o_index = m.label_names.index("O") if "O" in m.label_names else -1
  budget = attacks.Budget(FLAGS.max_frac, FLAGS.neighbours, FLAGS.min_cos, FLAGS.flips_tried)
  summaries, texts = {}, []
  for name in FLAGS.attacks:
    t = time.perf_counter()
    res = attacks.run_attack(name, victim, examples, budget, FLAGS.seed, nb, o_index,
                             m.tokenizer.unk_token or "[UNK]")
    summaries[name] = dict(attacks.summarize(res), wall_s=time.perf_counter() - t)
    texts.append(attacks.report_text(name, summaries[name]))
    logging.info("\n%s", texts[-1])
    shown = [r for r in res if r.status != "skipped"]
    reporting.write_text_atomic(os.path.join(FLAGS.workdir, f"attack_{name}_examples.txt"),
                                "\n\n".join(attacks.example_text(r, m.label_names)
                                            for r in shown) + "\n")
  flag_values = {k: getattr(FLAGS, k) for k in ("split", "num_examples", "attacks", "seed",
                                                "max_frac", "neighbours", "min_cos", "flips_tried")}
  body = dict(source=FLAGS.source, step=m.step, dataset=dataset, flags=flag_values,
              attacks=summaries)
  reporting.write_text_atomic(os.path.join(FLAGS.workdir, "attack_report.txt"),
                              "\n\n".join(texts) + "\n")
  reporting.write_text_atomic(out_json, json.dumps(body, indent=1) + "\n")
  print("\n\n".join(texts))
  print(f"-> {FLAGS.workdir}")


if __name__ == "__main__":
  cli.run(main)
