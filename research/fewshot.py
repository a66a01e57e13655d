"""Few-shot classification and NER: SetFit-style contrastive fine-tuning, standard fine-tuning and
prompt-based (cloze) methods on K-shot samples (per seed), evaluated on the full test set; a table
and a learning curve over K. config.fewshot.kind: 'classification' (K examples per class,
lib/fewshot) or 'ner' (K sentences per entity type, lib/fewshot_ner; configs/fewshot_ner.py).

  ./run.sh fewshot --config=configs/fewshot.py --workdir=workdirs/fewshot
  .venv/bin/python research/fewshot.py --config=configs/fewshot.py:quick --workdir=/tmp/fs
  .venv/bin/python research/fewshot.py --config=configs/fewshot.py:sentences+cloze \
      --config.cloze.mlm_source=workdirs/mlm_minilm_sst2 --workdir=workdirs/fewshot_cloze
  .venv/bin/python research/fewshot.py --config=configs/fewshot_ner.py --workdir=workdirs/fs_ner

Outputs in --workdir: data/k<K>_seed<S>/{train,validation,test}.tsv|.conll (the sample; the test
split whole; cloze_p<i>/: the same with pattern i applied), runs/<method>/k<K>_seed<S>[/lr<lr>_
bs<b>]/ (one skeleton run each: metrics.json, report, predictions; SetFit adds head.npz, cloze
runs log_probs.npz; lib/fewshot.run_cloze says where the cloze runs go), results.json (one row
per method, K, seed), table.md and learning_curve.png (test accuracy / F1 mean (std) over seeds
against K), metrics.json (mean dev/test per method and K; at one K also 'at_k': {method:
{dev, test}}: a tables/fewshot.py cell, --seed=N). A rerun skips finished runs. --merge=<dirs>
makes the table, curve and results of finished workdirs (e.g. a table's cells) without running.
"""

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lib import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/fewshot.py[:variant]", lock_config=True)
flags.DEFINE_string("workdir", None, "outputs (finished runs in it are reused)")
flags.DEFINE_integer("seed", -1, "one sample seed instead of config.fewshot.seeds (a table cell)")
flags.DEFINE_list("merge", [], "run nothing: the results.json of these workdirs (e.g. the cells of "
                  "tables/fewshot.py) make --workdir's table, curve and results")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # pylint: disable-next=g-import-not-at-top
  from lib import config_check, data, errors, fewshot, fewshot_ner, tasks
  cfg, root = FLAGS.config, FLAGS.workdir
  config_check.validate_run(cfg, choices={"task": tasks.TASKS})
  kinds = {"classification": fewshot, "ner": fewshot_ner}
  if cfg.fewshot.kind not in kinds:
    raise errors.ConfigError(f"config.fewshot.kind={cfg.fewshot.kind!r}; valid: {list(kinds)}")
  mod = kinds[cfg.fewshot.kind]
  unknown = [m for m in cfg.fewshot.methods if m not in mod.METHODS]
  if unknown:
    raise errors.ConfigError(f"config.fewshot.methods: unknown {unknown} for kind "
                             f"{cfg.fewshot.kind!r}; valid: {mod.METHODS}")
  if any(m.startswith("cloze") for m in cfg.fewshot.methods):   # before any run starts
    fewshot.check_cloze_config(cfg.cloze, data.source_of(dict(cfg.data)).label_names)
  logging.info("config:\n%s", cfg)
  if FLAGS.merge:
    results = []
    for wd in FLAGS.merge:
      with open(os.path.join(wd, "results.json"), encoding="utf-8") as f:
        results += json.load(f)["results"]
    return write_outputs(cfg, root, results, sorted({r["seed"] for r in results}))
  seeds = cfg.fewshot.seeds if FLAGS.seed < 0 else (FLAGS.seed,)
  results = []
  for k in cfg.fewshot.ks:
    for seed in seeds:
      name = f"k{k}_seed{seed}"
      paths = mod.write_kshot_data(cfg.data, k, seed, os.path.join(root, "data", name),
                                   cfg.fewshot.dev_k, cfg.fewshot.pool)
      for method in cfg.fewshot.methods:
        out = mod.run_method(cfg, method, paths, os.path.join(root, "runs"), name)
        results.append(dict(out, method=method, k=k, seed=seed))
        print(f"{method} K={k} seed={seed}: dev {out['dev']:.4f} test {out['test']:.4f} "
              f"({out['steps']} steps, {out['wall_s']:.0f} s)", flush=True)
  write_outputs(cfg, root, results, seeds)


def write_outputs(cfg, root, results, seeds):
  """results.json, table.md, learning_curve.png and metrics.json (per method and K: the mean
  dev/test metric; at one K also 'at_k': {method: {dev, test}}, a table cell's)."""
  from lib import fewshot, reporting  # pylint: disable=g-import-not-at-top
  fs, unit = cfg.fewshot, "per class" if cfg.fewshot.kind == "classification" else "per type"
  rows = fewshot.summarize(results)
  reporting.write_json_atomic(os.path.join(root, "results.json"),
                              dict(results=results, summary=rows, config=cfg.to_dict()))
  table = fewshot.table_markdown(rows, fs.full_data, fs.metric, unit, fs.full_data_source)
  reporting.write_text_atomic(os.path.join(root, "table.md"), table)
  fewshot.plot_learning_curve(os.path.join(root, "learning_curve.png"), rows, fs.full_data,
                              fs.metric, ("examples " if unit == "per class" else "sentences ")
                              + unit)
  metrics = {"seeds": list(seeds), "metric": fs.metric, "methods": {}}
  for r in rows:
    metrics["methods"].setdefault(r["method"], {})[f"k{r['k']}"] = dict(
        dev=r["dev_mean"], test=r["test_mean"], test_std=r["test_std"], n=r["n"])
  if len(fs.ks) == 1:     # a table cell: each method's dev and test at this K
    metrics["at_k"] = {r["method"]: dict(dev=r["dev_mean"], test=r["test_mean"]) for r in rows}
  reporting.write_json_atomic(os.path.join(root, "metrics.json"), metrics)
  print(table)


if __name__ == "__main__":
  cli.run(main)
