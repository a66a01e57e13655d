"""Distil a fine-tuned teacher into a smaller student (task-specific knowledge distillation).

  ./run.sh distill --config=configs/distill_sst2.py --workdir=workdirs/distill_sst2 \
      --config.distill.teacher=workdirs/sst2
  .venv/bin/python research/distill.py --config=configs/distill_ner.py:quick \
      --workdir=/tmp/distill_ner --config.distill.teacher=workdirs/ner_quick
  # the same student without distillation (same init, same steps): the `hard` variant
  ./run.sh distill --config=configs/distill_sst2.py:hard --workdir=workdirs/sst2_l3

The student is made from teacher layers config.distill.layers (default every other, ending with
the last) and written to <workdir>/student_init; with config.distill.student (a preset and/or
sizes: hidden_size, num_layers, num_heads, mlp_dim) it is a random init of that size instead, and
hidden-state terms go through learned projections that train with it but are not exported
(`:narrow`). Re-running with the same --workdir resumes. Outputs: those of research/finetune.py,
plus a `distill` block in metrics.json (teacher and student parameters, dev/test metric,
inference examples/s on the test set at batch 32, student_over_teacher, speedup).
Export: ./run.sh convert --to=hf --src=<workdir> --dst=<hf dir> (the student alone).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import distill_sst2  # pylint: disable=g-import-not-at-top,wrong-import-position
from lib import cli, distributed  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/distill_<task>.py[:variant]",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "outputs and checkpoints (an existing run is resumed)")
distributed.define_flags()   # --coordinator, --num_processes, --process_id (multi-host)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.initialize_from_flags()
  # pylint: disable-next=g-import-not-at-top  # after distributed init
  from lib import distill, tasks
  cfg = FLAGS.config
  preset = distill_sst2.student_preset(cfg)   # a random-init student instead of teacher layers
  logging.info("config:\n%s", cfg)
  out = distill.run(cfg, FLAGS.workdir, tasks.get(cfg.task), preset_args=preset)
  if out is None:
    return cli.preempted()
  print(f"{out['summary']}  ({out['train']['steps']} steps, {out['train']['wall_s']:.0f} s) -> "
        f"{FLAGS.workdir}")


if __name__ == "__main__":
  cli.run(main)
