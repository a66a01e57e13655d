"""Pretrain BERT with masked LM (no NSP) or GPT-2 with causal LM on packed plain text.

  ./run.sh pretrain --config=configs/mlm.py --workdir=workdirs/mlm_bert_mini
  ./run.sh pretrain --config=configs/mlm.py:minilm --workdir=workdirs/mlm_minilm_conll
  ./run.sh pretrain --config=configs/clm.py --workdir=workdirs/clm_gpt2_mini
  .venv/bin/python research/pretrain_mlm.py --config=configs/mlm.py:quick+bf16 --workdir=/tmp/mlm

Re-running with the same --workdir resumes from its latest checkpoint (exact data position).
Outputs (see lib/pretrain.py): model.json, checkpoints/, metrics.jsonl + TensorBoard events (loss,
tokens/s, fill = non-padding fraction, MFU), metrics.json, curves.png, samples.txt (CLM).
Fine-tune the result with `research/finetune.py --config.model.init_from=<workdir>`.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position
# pylint: disable-next=g-import-not-at-top,wrong-import-position
from lib import cli, distributed, errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/mlm.py[:variant] or configs/clm.py",
                                lock_config=True)
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
  from lib import models, pretrain
  cfg = FLAGS.config
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required (also for --explain_sharding: a trained "
                         "vocabulary is written there)")
  if bool(cfg.model.preset) == bool(cfg.model.init_from):
    raise errors.ConfigError(f"set exactly one of config.model.preset={cfg.model.preset!r} "
                             f"(random init) and config.model.init_from={cfg.model.init_from!r} "
                             "(continued pretraining)")
  model_args = None
  if cfg.model.preset:
    size = {k: v for k, v in cfg.model.size.items() if v}
    model_args = models.args_from_config(dict(common.model_config(cfg.model.preset), **size))
  logging.info("config:\n%s", cfg)
  out = pretrain.run(cfg, FLAGS.workdir, model_args=model_args,
                     explain_sharding=FLAGS.explain_sharding)
  if out is None and not FLAGS.explain_sharding:
    return cli.preempted()
  if out is not None:
    t = out["train"]
    print(f"{out['summary']}  ({t['steps']} steps, "
          f"{t['tokens_per_s']:.0f} tokens/s, packing {100 * t['packing']['fill_fraction']:.2f}%, "
          f"{t['wall_s']:.0f} s) -> {FLAGS.workdir}")


if __name__ == "__main__":
  cli.run(main)
