"""Causal probe (issue 15): layer-wise probes, activation patching, INLP, IG, synthetic facts.

  ./run.sh probe --config=configs/probe.py --out=workdirs/probe
  .venv/bin/python research/causal_probe.py --config=configs/probe.py:quick --out=/tmp/probe_q
  .venv/bin/python research/causal_probe.py --config=configs/probe.py --config.mode=patch \
      --out=workdirs/patch

Modes (`--config.mode`):
  probe   linear (probe.hidden > 0: MLP) probes on every hidden state of the frozen model at once
          (vmapped over the layer axis): POS, chunk, NER (CoNLL-2003 columns; the word's first
          sub-word), Brown POS, SST-2 (mean-pooled sentence); Hewitt-Liang control tasks ->
          selectivity; Tenney scalar mix -> expected layer. probes.txt/json/png.
  patch   exact activation patching on the encoder (NER: noise on an entity's word embeddings,
          score = the NER probe's probability of the gold tag at the entity), prefix reuse vs a
          per-cell loop timed, attribution patching and its Spearman correlation. patch.*
  inlp    INLP removes a property (inlp.property) at inlp.layer inside the forward pass; the
          final-layer probe's loss of inlp.target against a random projection of the same rank.
  ig      integrated gradients per token of the SST-2 probe's logit; completeness; ig.html/png.
  facts   synthetic subject-relation-object facts -> small GPT (CLM) -> causal traces.

Variants: quick (small subsets for a smoke run).
"""

import ml_collections

from configs import common


def get_config(variant: str = ""):
  c = ml_collections.ConfigDict()
  c.mode = "probe"
  c.seed = 0
  c.model = "minilm"             # a model source (HF dir, 'minilm', our model dir or run workdir)
  c.data_dir = common.DATA_DIR
  c.probe = ml_collections.ConfigDict(dict(
      tasks="pos,chunk,ner,brown_pos,sst2",
      train_sentences=2000,        # the first N sentences of CoNLL/Brown train
      eval_sentences=500,          # the first N of CoNLL valid / Brown validation
      sst2_train=2000, sst2_eval=872,
      pool="first",                # first | mean (sub-words of a word)
      hidden=0,                    # 0 = linear probe, else the MLP probe's width
      steps=1500, train_batch=256, lr=1e-3,
      max_len=128, batch_size=32))
  c.patch = ml_collections.ConfigDict(dict(
      examples=200, window=1, noise_scale=3.0, chunk=16, benchmark_examples=8,
      max_len=32, train_sentences=2000))
  c.inlp = ml_collections.ConfigDict(dict(
      property="pos", target="ner", layer=2, iterations=20, steps=600, train_sentences=1000,
      eval_sentences=300))
  c.ig = ml_collections.ConfigDict(dict(steps=64, examples=12, train=2000))
  c.facts = ml_collections.ConfigDict(dict(
      subjects=600, relations=6, steps=3000, trace=500, layers=4, hidden=128, batch=64))
  return common.apply_variant(c, variant, {"quick": _quick})


def _quick(c):
  c.probe.train_sentences, c.probe.eval_sentences = 200, 100
  c.probe.sst2_train, c.probe.sst2_eval, c.probe.steps = 200, 100, 200
  c.patch.examples, c.patch.benchmark_examples, c.patch.train_sentences = 8, 2, 300
  c.inlp.iterations, c.inlp.train_sentences, c.inlp.eval_sentences = 4, 200, 100
  c.ig.examples, c.ig.train = 4, 300
  c.facts.subjects, c.facts.steps, c.facts.trace = 60, 300, 20
