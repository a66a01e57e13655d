"""Continual learning with MiniLM: SST-2 -> CoNLL-2003 NER -> Brown POS, each task its own block of
one shared output layer (the task is known at train and test time), methods compared on the
accuracy matrix R[i, j] (test accuracy on task j after training task i), average accuracy,
backward transfer and forgetting (lib/continual.py).

  ./run.sh continual --config=configs/continual.py --workdir=workdirs/continual
  .venv/bin/python research/continual.py --config=configs/continual.py:quick --workdir=/tmp/cl

Methods: naive (sequential fine-tuning), replay (a buffer of replay_percent % of each earlier
task's training examples; replay_rows of them appended to every batch), ewc (penalty
ewc_lambda / 2 * sum F (theta - theta*)^2, empirical diagonal Fisher on fisher_examples training
examples of each earlier task), lora (per-task LoRA r=8 on the attention projections + the
task's label block, from the base model each time; task j routed to adapter j).
Subsampled for the CPU: max_train_examples per task (1 epoch), max_eval_examples per test set;
accuracy = sentences (SST-2) or words (NER tags incl. O, POS tags).
Variants: quick (100 training / 50 test examples per task, naive and lora), and one method alone:
naive, replay, ewc, lora.
"""

import ml_collections

from configs import common


def get_config(variant: str = ""):
  c = common.finetune_base()
  c.task = "continual"
  c.data.dataset = "sst2"           # unused: each stage's data comes from continual.tasks
  c.data.max_len = 64
  c.data.batch_size = 16
  c.data.eval_batch_size = 64
  c.optim.lr = 1e-4
  c.optim.weight_decay = 0.01
  c.train.epochs, c.train.eval_every, c.train.keep, c.train.log_every = 1, 0, 1, 10
  c.continual = ml_collections.ConfigDict(dict(
      tasks=(("sst2", "sst2"), ("ner", "conll2003"), ("pos", "brown_pos")),
      methods=("naive", "replay", "ewc", "lora"),
      max_train_examples=500, max_eval_examples=200,
      buckets=(32, 64),                # padded lengths: two train-step compilations a stage
      replay_percent=1.0, replay_rows=4,
      ewc_lambda=1000.0, fisher_examples=64, fisher_chunk=4,
      lora_rules=(("classifier/.*", "train"),
                  (".*/attention/(query|key|value|out)/kernel",
                   "lora(rank=8, alpha=16, dropout=0.1)"),
                  (".*", "freeze")),
      lora_lr=2e-3,
  ))
  one = lambda m: lambda c: setattr(c.continual, "methods", (m,))
  return common.apply_variant(c, variant, {
      "quick": _quick, "naive": one("naive"), "replay": one("replay"), "ewc": one("ewc"),
      "lora": one("lora")})


def _quick(c):
  c.continual.max_train_examples, c.continual.max_eval_examples = 100, 50
  c.continual.methods = ("naive", "lora")
