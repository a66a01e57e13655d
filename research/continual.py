"""Continual learning over a task sequence: the accuracy matrix, average accuracy, backward transfer
and forgetting of each method (naive, replay, EWC, per-task LoRA), a table and heatmaps.

  ./run.sh continual --config=configs/continual.py --workdir=workdirs/continual
  .venv/bin/python research/continual.py --config=configs/continual.py:quick --workdir=/tmp/cl

Outputs in --workdir: <method>/<i>_<task>/ (one skeleton run per stage: model.json, checkpoints,
metrics.json with the stage's row of test accuracies), <method>/heatmap.png, results.json (the
matrices and metrics), table.md, and metrics.json (each method's average accuracy, backward
transfer, forgetting: `metrics`), written last. A rerun reads finished stages back.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lib import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/continual.py[:variant]",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "outputs (finished stages in it are reused)")
flags.mark_flags_as_required(["config", "workdir"])


def _table(results) -> str:
  lines = ["| method | average accuracy | backward transfer | forgetting | trainable params "
           "per task |", "|---|---|---|---|---|"]
  for r in results:
    lines.append(f"| {r['method']} | {r['average_accuracy']:.4f} | "
                 f"{r['backward_transfer']:+.4f} | {r['forgetting']:.4f} | "
                 f"{max(r['trainable_params_per_stage']):,} |")
  for r in results:
    lines += ["", f"{r['method']}: R[i, j] (rows: after task i; columns: task j)",
              "| after \\ on | " + " | ".join(r["tasks"]) + " |",
              "|---" * (len(r["tasks"]) + 1) + "|"]
    lines += [f"| {t} | " + " | ".join("-" if v != v else f"{v:.4f}" for v in row) + " |"
              for t, row in zip(r["tasks"], r["matrix"])]
  return "\n".join(lines) + "\n"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # pylint: disable-next=g-import-not-at-top
  from lib import config_check, continual, reporting
  cfg, root = FLAGS.config, FLAGS.workdir
  config_check.validate_run(cfg)
  logging.info("config:\n%s", cfg)
  results = []
  for method in cfg.continual.methods:
    r = continual.run_sequence(cfg, method, os.path.join(root, method))
    continual.plot_heatmap(os.path.join(root, method, "heatmap.png"), r["matrix"], r["tasks"],
                           f"{method}: test accuracy")
    results.append(r)
    print(f"{method}: average accuracy {r['average_accuracy']:.4f}  BWT "
          f"{r['backward_transfer']:+.4f}  forgetting {r['forgetting']:.4f}", flush=True)
  reporting.write_json_atomic(os.path.join(root, "results.json"),
                              dict(results=results, config=cfg.to_dict()))
  table = _table(results)
  reporting.write_text_atomic(os.path.join(root, "table.md"), table)
  # Last: a declared table's cell (tables/continual.py) is finished when this file exists.
  reporting.write_json_atomic(os.path.join(root, "metrics.json"), metrics(results))
  print(table)


def metrics(results) -> dict:
  """metrics.json: one entry per method in run order (what tables/continual.py reads as
  `methods.0.<key>`), the accuracy on each task at the end (`final`) and right after learning it
  (`learned`: R[i, i]), and the largest trainable count."""
  keep = ("method", "average_accuracy", "backward_transfer", "forgetting")
  return dict(methods=[dict({k: r[k] for k in keep},
                            final={t: v for t, v in zip(r["tasks"], r["matrix"][-1])},
                            learned={t: r["matrix"][i][i] for i, t in enumerate(r["tasks"])},
                            trainable_params_per_task=max(r["trainable_params_per_stage"]))
                       for r in results])


if __name__ == "__main__":
  cli.run(main)
