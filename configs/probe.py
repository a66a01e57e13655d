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
          Measured on MiniLM (AMD EPYC, 2 shared cores, 491 s; --config.probe.train_sentences=
          1000 eval_sentences=300 sst2_train=1000 sst2_eval=300 steps=600): best layer / max
          selectivity / expected layer: POS L2 0.883 / 0.384 / 2.69, chunk L2 0.850 / 0.268 /
          2.61, NER L4 0.915 / 0.208 / 3.13, Brown POS L2 0.889 / 0.321 / 2.75, SST-2 L4 0.770 /
          0.310 / 3.08: POS below NER in expected layer, as Tenney et al. found for BERT.
  patch   exact activation patching on the encoder (NER: noise on an entity's word embeddings,
          score = the NER probe's probability of the gold tag at the entity), prefix reuse vs a
          per-cell loop timed, attribution patching and its Spearman correlation. patch.*
  inlp    INLP removes a property (inlp.property) at inlp.layer inside the forward pass (until a
          probe is at the majority baseline); the final-layer probe's loss of inlp.target against
          a random projection of the same rank. Measured on MiniLM (AMD EPYC, 2 shared cores,
          171 s; 1,000 / 300 CoNLL-2003 sentences): NER removed at hidden state 2 in 11
          iterations (rank 90; NER probe 0.922 -> 0.779, majority 0.781); the last-layer POS probe
          falls from 0.811 to 0.709 (loss 0.897 -> 1.253), against 0.804 (loss 0.932) for 90
          random directions. With inlp.property=pos (45 tags, 45 directions per iteration) INLP
          needs all 384 dimensions, so its random control is the same projection: no result.
  ig      integrated gradients per token of the SST-2 probe's logit; completeness (measured: max
          error 0.19%, mean 0.04% over 12 sentences, 64 Gauss-Legendre nodes); ig.html/png.
  facts   causal tracing (ROME) of synthetic facts (lib/probe/tracing.py): 150 invented subjects x
          6 relations, each fact stated 4 times in 3 training templates (+10% distractors); 30% of
          the subjects also in each relation's query template, the other 70% (630 facts) never:
          their query-template recall is the measure. A 4-layer, width-128 GPT (0.93M params,
          BPE of 1,024 tokens trained on the corpus) through the CLM pretraining path
          (facts.clm: batch 32 x 64 tokens, lr 2e-3, 1,000 steps, corpus and workdir under
          --out); recall = greedy decoding of every object token; then 500 recalled facts
          traced (noise 3 sd on the subject's word embeddings; residual / MLP / attention
          restored per layer x position, prefix reuse), the per-cell loop timed on 6 of them,
          attribution patching + Spearman; facts.png (three ROME panels), facts.json.
          Measured (AMD EPYC, 2 shared cores, 1238 s in all): recall 0.9889 (623/630); grid 56 s
          for 500 facts x 169 cells vs 722 s per-cell loop (extrapolated from 6 facts timed in
          the same process, 13.6x there), max |diff| 1.9e-6 (float32 probabilities); Spearman
          attribution vs exact 0.72 (resid 0.57, attn 0.87, mlp 0.79); peak indirect effect at
          the last token (hidden state 4: 0.77; MLP layer 3: 0.31; attention layer 1: 0.39);
          on the subject the MLP effect sits in layer 0 (middle/last subject token 0.17/0.15),
          not in middle layers as in ROME.

Variants: quick (small subsets for a smoke run).
"""

import ml_collections

from configs import clm
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
      property="ner", target="pos", layer=2, iterations=20, steps=600, train_sentences=1000,
      eval_sentences=300))
  c.ig = ml_collections.ConfigDict(dict(steps=64, examples=12, train=2000))
  c.facts = ml_collections.ConfigDict(dict(
      subjects=150, relations=6, objects=12, repeats=4, distractors=0.1,
      query_frac=0.3,              # subjects whose facts are also stated in the query template
      trace=500,                   # known (recalled) held-out facts traced
      window=1, noise_scale=3.0, chunk=32, benchmark_facts=6, max_len=24))
  c.facts.clm = _fact_clm()
  # The preset's architecture (random init); clm.model.size's non-zero fields change it.
  c.facts.preset = common.model_config(c.facts.clm.model.preset)
  return common.apply_variant(c, variant, {"quick": _quick})


def _fact_clm() -> ml_collections.ConfigDict:
  """The CLM pretraining config (configs/clm.py) of the facts GPT (gpt2-tiny at 4 layers, width
  128, no dropout; a byte-level BPE of 1,024 tokens trained on the corpus); data.dataset is
  filled in with the generated corpus (a text: folder under the output directory)."""
  c = clm.get_config()
  c.model.preset, c.model.dropout_rate = "gpt2-tiny", 0.0
  c.model.size.update(num_layers=4, hidden_size=128, num_heads=4, mlp_dim=512, max_len=64)
  c.vocab.size, c.vocab.lowercase, c.vocab.min_frequency = 1024, False, 2
  c.data.dataset, c.data.max_len, c.data.batch_size = "", 64, 32
  c.data.eval_batches = 4
  c.optim.lr, c.optim.weight_decay = 2e-3, 0.01
  c.train.num_steps, c.train.eval_every, c.train.checkpoint_every = 1000, 250, 250
  c.train.log_every = 100
  c.samples.prompts = []
  return c


def _quick(c):
  c.probe.train_sentences, c.probe.eval_sentences = 200, 100
  c.probe.sst2_train, c.probe.sst2_eval, c.probe.steps = 200, 100, 200
  c.patch.examples, c.patch.benchmark_examples, c.patch.train_sentences = 8, 2, 300
  c.inlp.iterations, c.inlp.train_sentences, c.inlp.eval_sentences = 4, 200, 100
  c.ig.examples, c.ig.train = 4, 300
  c.facts.subjects, c.facts.query_frac, c.facts.trace, c.facts.benchmark_facts = 60, 0.5, 40, 2
  c.facts.clm.train.num_steps, c.facts.clm.train.eval_every = 300, 150
  c.facts.clm.train.checkpoint_every = 150
