"""Few-shot SST-2 with MiniLM: SetFit-style contrastive fine-tuning, standard fine-tuning and
prompt-based cloze methods on K examples per class (LM-BFF's protocol: per seed a K-shot train
and a K-shot dev set of the same size from the training split, the grid point with the best K-shot
dev accuracy, the full test set).

  ./run.sh fewshot --config=configs/fewshot.py --workdir=workdirs/fewshot
  .venv/bin/python research/fewshot.py --config=configs/fewshot.py:curve --workdir=/tmp/fewshot

Variants: (none) K = 16, seeds 0-4, setfit, frozen and finetune; curve: K in 8, 16, 32, 64;
curve_new: K in 8, 32, 64 (the curve without the measured K = 16); quick: seed 0, K = 16, one
grid point (smoke test); setfit / frozen / finetune: that method alone;
cloze: the four cloze methods alone (cloze_zeroshot, cloze_finetune, ..._pet: one of them);
k8 / k16 / k32 / k64: that K alone (a row of tables/fewshot.py); sentences: sample from full
sentences only (LM-BFF's pool; the test set is sentences).
SetFit: pairs of the K-shot set (20 iterations: one positive and one negative partner per example
each; at most 1,280 pairs), cosine-similarity loss on mean-pooled embeddings, 1 epoch, batch 16,
lr 2e-5 (SetFit's default; 1e-4 collapses the pairs (cosine gap 0.97) and tested 1.9-3.4 points
lower on all three paired samples tried); then a logistic-regression head (C = 1, sklearn's
default) on the L2-normalised embeddings.
Frozen: the same head on the untouched encoder (the baseline the contrastive step must beat).
Standard fine-tuning: pooler + classifier, 100 steps, dev evaluation every 25, lr 5e-5, batch 8
(variant grid: lr in {1e-5, 2e-5, 5e-5}; LM-BFF: 1,000 steps, lr in {1e-5, 2e-5, 5e-5} x batch
{2, 4, 8}: cut for the CPU).
Cloze (lib/fewshot.run_cloze, lib/tasks/cloze): pattern + verbalizer (great / terrible) scored
by the MLM head of cloze.mlm_source at the mask, over the label words only. cloze_zeroshot:
pattern 0 as is; cloze_finetune: LM-BFF's prompt-based fine-tuning of encoder and MLM head
(cross-entropy over the label words; the standard fine-tuning's 100 steps, lr 5e-5, batch 8,
dev every 25); _pet: every pattern, the mean of their log-probabilities. MiniLM has no MLM head:
make one first (a new head tied to the word embeddings, ~11 CPU-minutes; step 100 used):
  .venv/bin/python research/pretrain_mlm.py --config=configs/mlm.py:minilm \
      --config.data.dataset=text:sst2 --config.train.num_steps=150 --config.train.eval_every=50 \
      --config.train.checkpoint_every=50 --config.data.eval_batches=4 \
      --workdir=workdirs/mlm_minilm_sst2
  .venv/bin/python research/fewshot.py --config=configs/fewshot.py:sentences+cloze \
      --config.cloze.mlm_source=workdirs/mlm_minilm_sst2@100 --workdir=workdirs/fewshot_cloze
Measured: see research/fewshot.py's table.md in the workdir and the README.
"""

import functools

import ml_collections

from configs import common
from configs import sst2


def get_config(variant: str = ""):
  c = sst2.get_config()
  c.train.epochs, c.train.num_steps, c.train.eval_every = 0, 100, 25
  c.train.keep, c.train.log_every = 1, 25
  c.optim.warmup_frac = 0.1
  c.data.batch_size = 8
  c.data.eval_batch_size = 128
  c.fewshot = ml_collections.ConfigDict(dict(
      kind="classification",                     # K examples per class (lib/fewshot)
      ks=(16,), seeds=(0, 1, 2, 3, 4), methods=("setfit", "frozen", "finetune"),
      dev_k=-1,                                  # dev examples per class (< 0: K)
      pool="all",                                # all | sentences (lib/fewshot.sentence_like)
      grid=((5e-5, 8),),                         # standard fine-tuning: (lr, batch size)
      # SetFit's run: 'block.key' -> value over the fine-tuning settings above.
      setfit_overrides=(("optim.lr", 2e-5), ("data.batch_size", 16), ("train.num_steps", 0),
                        ("train.epochs", 1), ("train.eval_every", 0)),
      metric="accuracy",
      full_data=0.8962,                          # configs/sst2.py, seed 0, whole training set
      full_data_source="configs/sst2.py, seed 0",
  ))
  c.setfit = ml_collections.ConfigDict(dict(iterations=20, max_pairs=1280, c=1.0, normalize=True))
  # Prompt-based (cloze) methods: the MLM head of mlm_source (any model source with one; MiniLM
  # has none: continue it with research/pretrain_mlm.py first, see the docstring).
  c.cloze = ml_collections.ConfigDict(dict(
      mlm_source="workdirs/mlm_minilm_sst2@100",
      # '{sentence}' and exactly one '{mask}'; pattern 0 is the single-pattern methods' (LM-BFF's
      # manual SST-2 template), all of them form the _pet ensembles (LM-BFF's best automatic
      # templates for SST-2).
      patterns=("{sentence} It was {mask}.", "{sentence} A {mask} one.",
                "{sentence} All in all {mask}."),
      verbalizer=(("negative", "terrible"), ("positive", "great")),   # (label, one-token word)
      grid=((5e-5, 8),),                         # prompt-based fine-tuning: (lr, batch size)
      # 'block.key' -> value over the fine-tuning settings above (the pattern adds tokens).
      overrides=(("data.max_len", 128),),
  ))
  return common.apply_variant(c, variant, {
      "curve": lambda c: setattr(c.fewshot, "ks", (8, 16, 32, 64)),
      "curve_new": lambda c: setattr(c.fewshot, "ks", (8, 32, 64)),   # K = 16 measured apart
      "quick": _quick,
      "sentences": lambda c: setattr(c.fewshot, "pool", "sentences"),
      "grid": lambda c: setattr(c.fewshot, "grid", ((1e-5, 8), (2e-5, 8), (5e-5, 8))),
      "setfit": lambda c: setattr(c.fewshot, "methods", ("setfit",)),
      "finetune": lambda c: setattr(c.fewshot, "methods", ("finetune",)),
      "frozen": lambda c: setattr(c.fewshot, "methods", ("frozen",)),
      "cloze": lambda c: setattr(c.fewshot, "methods", ("cloze_zeroshot", "cloze_zeroshot_pet",
                                                        "cloze_finetune", "cloze_finetune_pet")),
      **{m: functools.partial(_method, m=m) for m in ("cloze_zeroshot", "cloze_zeroshot_pet",
                                                      "cloze_finetune", "cloze_finetune_pet")},
      **{f"k{k}": functools.partial(_k, k=k) for k in (8, 16, 32, 64)},
  })


def _method(c, m):
  c.fewshot.methods = (m,)


def _k(c, k):
  c.fewshot.ks = (k,)


def _quick(c):
  c.fewshot.seeds = (0,)
