"""Few-shot CoNLL-2003 NER with MiniLM: standard fine-tuning, SetFit-style contrastive fine-tuning
of word embeddings and the frozen-encoder baseline on K sentences per entity type (PER, ORG, LOC,
MISC), evaluated with entity F1 (seqeval) on the full 3,453-sentence test set.

  .venv/bin/python research/fewshot.py --config=configs/fewshot_ner.py --workdir=workdirs/fs_ner
  .venv/bin/python research/fewshot.py --config=configs/fewshot_ner.py --workdir=/tmp/fs_ner \
      --seed=0     # one seed (a tables/fewshot.py cell)

Variants: (none) K in 5, 10, 20, seeds 0-2, setfit, frozen and finetune; seeds5: seeds 0-4;
quick: K = 5, seed 0; setfit / frozen / finetune: that method alone; k5 / k10 / k20: that K alone.
Samples (lib/fewshot_ner): per seed, Yang & Katiyar's greedy sampling over the training split:
sentences until every type occurs in >= K of them; a K-shot dev set the same way from the rest;
never dev/test. Seeds 0-2 train on 12-17 sentences (160-304 words) at K=5, 24-28 at K=10,
49-51 (763-952 words) at K=20.
Standard fine-tuning: token classifier (first sub-word), 100 steps, dev F1 every 25 (the best
checkpoint is tested), batch 8, lr 1e-4 (configs/ner.py's lr; the SST-2 few-shot protocol
otherwise).
SetFit-style (lib/tasks/token_contrastive): pairs of words (every entity word and as many 'O'
words per iteration; one same-tag and one other-tag partner each; iterations cut to keep <= 640
pairs, SST-2's 1,280 halved for the CPU budget, but at least one: 680 at K=20), cosine loss
on the words' last hidden states, 1 epoch, batch 16, lr 2e-5; then a logistic-regression tagger
on the L2-normalised word embeddings, C in 1, 10, 100, 1000 chosen on the K-shot dev F1.
Frozen: that tagger on the untouched encoder.
Full-data reference: configs/ner.py, test F1 0.8607 (mean of seeds 0-2).
"""

import ml_collections

from configs import common
from configs import ner


def get_config(variant: str = ""):
  c = ner.get_config()
  c.train.epochs, c.train.num_steps, c.train.eval_every = 0, 100, 25
  c.train.keep, c.train.log_every = 1, 25
  c.optim.warmup_frac = 0.1
  c.data.batch_size, c.data.eval_batch_size = 8, 64
  c.data.label_names = ()          # set to the dataset's tags on the K-shot files
  c.fewshot = ml_collections.ConfigDict(dict(
      kind="ner",                                # K sentences per entity type (lib/fewshot_ner)
      ks=(5, 10, 20), seeds=(0, 1, 2), methods=("setfit", "frozen", "finetune"),
      dev_k=-1,                                  # dev sentences per type (< 0: K)
      pool="all",
      grid=((1e-4, 8),),                         # standard fine-tuning: (lr, batch size)
      setfit_overrides=(("optim.lr", 2e-5), ("data.batch_size", 16), ("train.num_steps", 0),
                        ("train.epochs", 1), ("train.eval_every", 0)),
      metric="f1",
      full_data=0.8607,                          # configs/ner.py, mean of seeds 0-2
      full_data_source="configs/ner.py, 3 seeds",
  ))
  # c_grid: the tagger's inverse L2 strength, chosen on the K-shot dev F1 (C = 1, SetFit's, tags
  # every word 'O' at K = 5: ~160 training words, 80% of them 'O').
  c.setfit = ml_collections.ConfigDict(dict(iterations=20, max_pairs=640, c=1.0, normalize=True,
                                            outside_ratio=1.0, c_grid=(1.0, 10.0, 100.0, 1000.0)))
  return common.apply_variant(c, variant, {
      "quick": _quick,
      "seeds5": lambda c: setattr(c.fewshot, "seeds", (0, 1, 2, 3, 4)),
      "setfit": lambda c: setattr(c.fewshot, "methods", ("setfit",)),
      "finetune": lambda c: setattr(c.fewshot, "methods", ("finetune",)),
      "frozen": lambda c: setattr(c.fewshot, "methods", ("frozen",)),
      "k5": lambda c: setattr(c.fewshot, "ks", (5,)),
      "k10": lambda c: setattr(c.fewshot, "ks", (10,)),
      "k20": lambda c: setattr(c.fewshot, "ks", (20,)),
  })


def _quick(c):
  c.fewshot.ks, c.fewshot.seeds = (5,), (0,)
