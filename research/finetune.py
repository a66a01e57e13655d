"""Fine-tune a BERT/GPT-2 model for NER (token classification) or SST-2 (sequence classification).

  ./run.sh finetune --config=configs/ner.py --workdir=workdirs/ner
  .venv/bin/python research/finetune.py --config=configs/sst2.py:quick --workdir=/tmp/sst2 \
      --config.optim.lr=3e-5 --config.model.init_from=/path/to/hf_bert_dir

Re-running with the same --workdir resumes from its latest checkpoint (exact data position).
Outputs (see lib/finetune.py): metrics.json, report.txt, test_predictions.*, curves.png,
TensorBoard events, checkpoints/.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from lib import cli, distributed  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/<task>.py[:variant]", lock_config=True)
flags.DEFINE_string("workdir", None, "outputs and checkpoints (an existing run is resumed)")
flags.DEFINE_bool("explain_sharding", False, "print path, shape, PartitionSpec and bytes per "
                  "device of every parameter (and totals), then exit")
distributed.define_flags()   # --coordinator, --num_processes, --process_id (multi-host)
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.initialize_from_flags()
  # pylint: disable-next=g-import-not-at-top  # after distributed init
  from lib import finetune, models
  cfg = FLAGS.config
  if not FLAGS.workdir and not FLAGS.explain_sharding:
    raise app.UsageError("--workdir is required")
  model_args = None
  if cfg.model.preset:  # random init of a preset architecture
    model_args = models.args_from_config(common.model_config(cfg.model.preset))
  logging.info("config:\n%s", cfg)
  out = finetune.run(cfg, FLAGS.workdir, source=cfg.model.init_from, model_args=model_args,
                     explain_sharding=FLAGS.explain_sharding)
  if out is None and not FLAGS.explain_sharding:
    return cli.preempted()
  if out is not None:
    print(f"{out['summary']}  ({out['train']['steps']} steps, {out['train']['wall_s']:.0f} s) -> "
          f"{FLAGS.workdir}")


if __name__ == "__main__":
  cli.run(main)
