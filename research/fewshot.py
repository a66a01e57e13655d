"""Few-shot classification: SetFit-style contrastive fine-tuning, standard fine-tuning and
prompt-based (cloze) methods on K-shot samples (per seed), evaluated on the full test set; a table
and a learning curve over K.

  ./run.sh fewshot --config=configs/fewshot.py --workdir=workdirs/fewshot
  .venv/bin/python research/fewshot.py --config=configs/fewshot.py:quick --workdir=/tmp/fs
  .venv/bin/python research/fewshot.py --config=configs/fewshot.py:sentences+cloze \
      --config.cloze.mlm_source=workdirs/mlm_minilm_sst2 --workdir=workdirs/fewshot_cloze

Outputs in --workdir: data/k<K>_seed<S>/{train,validation,test}.tsv (the sample; the test split
whole; cloze_p<i>/: the same with pattern i applied), runs/<method>/k<K>_seed<S>[/lr<lr>_bs<b>]/
(one skeleton run each: metrics.json, report, predictions; SetFit adds head.npz, cloze runs
log_probs.npz; lib/fewshot.run_cloze says where the cloze runs go), results.json (one row per
method, K, seed), table.md and learning_curve.png (test accuracy mean (std) over seeds against
K). A rerun skips finished runs.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lib import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/fewshot.py[:variant]", lock_config=True)
flags.DEFINE_string("workdir", None, "outputs (finished runs in it are reused)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # pylint: disable-next=g-import-not-at-top
  from lib import config_check, data, errors, fewshot, reporting, tasks
  cfg, root = FLAGS.config, FLAGS.workdir
  config_check.validate_run(cfg, choices={"task": tasks.TASKS})
  unknown = [m for m in cfg.fewshot.methods if m not in fewshot.METHODS]
  if unknown:
    raise errors.ConfigError(f"config.fewshot.methods: unknown {unknown}; valid: "
                             f"{fewshot.METHODS}")
  if any(m.startswith("cloze") for m in cfg.fewshot.methods):   # before any run starts
    fewshot.check_cloze_config(cfg.cloze, data.source_of(dict(cfg.data)).label_names)
  logging.info("config:\n%s", cfg)
  results = []
  for k in cfg.fewshot.ks:
    for seed in cfg.fewshot.seeds:
      name = f"k{k}_seed{seed}"
      paths = fewshot.write_kshot_data(cfg.data, k, seed, os.path.join(root, "data", name),
                                       cfg.fewshot.dev_k, cfg.fewshot.pool)
      for method in cfg.fewshot.methods:
        out = fewshot.run_method(cfg, method, paths, os.path.join(root, "runs"), name)
        results.append(dict(out, method=method, k=k, seed=seed))
        print(f"{method} K={k} seed={seed}: dev {out['dev']:.4f} test {out['test']:.4f} "
              f"({out['steps']} steps, {out['wall_s']:.0f} s)", flush=True)
  rows = fewshot.summarize(results)
  full = cfg.fewshot.full_data_accuracy
  reporting.write_json_atomic(os.path.join(root, "results.json"),
                              dict(results=results, summary=rows, config=cfg.to_dict()))
  table = fewshot.table_markdown(rows, full)
  reporting.write_text_atomic(os.path.join(root, "table.md"), table)
  fewshot.plot_learning_curve(os.path.join(root, "learning_curve.png"), rows, full)
  print(table)


if __name__ == "__main__":
  cli.run(main)
