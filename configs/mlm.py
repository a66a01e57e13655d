"""BERT masked-LM pretraining (no NSP, as RoBERTa) on packed rows of the plain-text corpora.

  ./run.sh pretrain --config=configs/mlm.py --workdir=workdirs/mlm_bert_mini
  ./run.sh pretrain --config=configs/mlm.py:minilm --workdir=workdirs/mlm_minilm_conll
  .venv/bin/python research/pretrain_mlm.py --config=configs/mlm.py:quick --workdir=/tmp/mlm_quick

Variants (`--config=configs/mlm.py:<variant>`, combine with '+'):
  (none)     bert-mini (4 layers, hidden 256, 11.2M params) from random init with MiniLM's uncased
             WordPiece, on the training text of Brown, Shakespeare, CoNLL-2003 and SST-2 (2.46M
             word-pieces) packed into 128-token rows (documents [CLS] .. [SEP], attention kept
             inside each document), batch 32, 15% of the tokens masked (80% [MASK], 10% random,
             10% kept), the MLM head on the masked positions only; no dropout (the run is far
             from overfitting: Geiping & Goldstein's "cramming"); AdamW lr 5e-4, wd 0.01, 6%
             warmup then linear decay, 1,600 steps (~2.7 epochs); held-out (validation) MLM loss
             and masked-token accuracy on 10 batches per corpus every 400 steps. About 25 minutes
             on the idle 2-core CPU (1.2 steps/s, ~5,000 tokens/s; 0.65 steps/s when other jobs
             share it). Measured on shorter runs: held-out loss 6.79, masked accuracy 11.4% after
             600 steps (the same lr, decay to 0 at 600). Fine-tune from the workdir with
             `--config.model.init_from=<workdir>` (set the fine-tuning dropout explicitly, e.g.
             `--config.model.dropout_rate=0.1`, since the checkpoint records 0).
  minilm     continued pretraining of the installed MiniLM on the CoNLL-2003 training text: its MLM
             head (which the checkpoint lacks) is initialised, the decoder tied to the word
             embeddings; lr 5e-5 (the new head 20x), 300 steps (~5 epochs of that text), about 11
             minutes (0.5 steps/s). Measured: held-out CoNLL MLM loss 4.90, masked accuracy 25.5%;
             configs/ner.py fine-tuned from it: test F1 0.8613 (from the original MiniLM: 0.8579).
  wordpiece  a new uncased WordPiece vocabulary of 8,192 tokens trained on the corpora with the
             `tokenizers` library (saved in <workdir>/tokenizer, recorded in model.json).
  wwm        whole-word masking.
  bf16       bfloat16 compute (parameters and optimizer state stay float32); 1.44 vs 1.2 steps/s
             for bert-mini on the CPU.
  remat      rematerialise every layer in the backward pass ('full'; 'dots' keeps the matmuls).
  accum4     the batch in 4 micro-batches (gradient accumulation: same update, 1/4 the activations).
  quick      40 steps, evaluation on 4 batches per corpus (smoke test of the whole run).

The log prints tokens/s, `fill` (non-padding fraction of the rows; the packing line at the start
gives it for a whole epoch) and MFU against `train.peak_flops` (set the device's datasheet number
on GPU/TPU; -1 measures a large matmul on this machine instead, for CPU).
"""

import ml_collections

from configs import common


def base(objective: str) -> ml_collections.ConfigDict:
  """Fields shared by the pretraining configs (this file and configs/clm.py)."""
  from lib import optim, sharding, train  # configs may use lib; lib never imports configs
  c = ml_collections.ConfigDict()
  c.objective = objective             # mlm (BERT) | clm (GPT-2)
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      preset="bert-mini",             # random init of a configs/common.py preset ...
      init_from="",                   # ... or continue from a HF dir, 'minilm', our model/workdir
      tokenizer="",                   # '' = the source's own (random init: 'minilm' / gpt2-bpe)
      dtype="float32", param_dtype="float32", remat="none",
      dropout_rate=-1.0,              # < 0: the preset's / checkpoint's value
      # Architecture changes to the preset (0 = the preset's value), e.g. a deeper bert-mini.
      size=ml_collections.ConfigDict(dict(num_layers=0, hidden_size=0, num_heads=0, mlp_dim=0,
                                          max_len=0)),
  ))
  # vocab.size > 0: train a new vocabulary (WordPiece for mlm, byte-level BPE for clm) of that size
  # on the training split of the corpora into <workdir>/tokenizer; the model's vocab follows it.
  c.vocab = ml_collections.ConfigDict(dict(size=0, lowercase=True, min_frequency=2))
  # dataset: comma-separated corpora (text:brown, text:shakespeare, text:conll2003, text:sst2),
  # mixed in proportion to their size; held-out = their validation splits. eval_batches: batches
  # per corpus at each evaluation (0 = the whole split).
  c.data = ml_collections.ConfigDict(dict(
      dataset="text:brown,text:shakespeare,text:conll2003,text:sst2", dir=common.DATA_DIR,
      cache_dir="", max_len=128, batch_size=32, eval_batch_size=32, eval_batches=10,
      mlm_rate=0.15, whole_word_masking=False))
  c.predictions_per_row = -1          # MLM head positions per row: -1 ceil(rate * len), 0 = all
  # Ordered (regex, label) rules: what is trained and lr groups (lib/peft; as configs/common.py).
  c.peft = ml_collections.ConfigDict(dict(rules=((".*", "train"),), options=()))
  c.optim = optim.default_config()
  c.optim.lr = 5e-4
  c.optim.weight_decay = 0.01
  c.optim.warmup_frac = 0.06
  c.train = train.default_config()
  c.train.num_steps = 1600
  c.train.log_every = 50
  c.train.eval_every = 400
  c.train.checkpoint_every = 400
  c.train.keep = 2
  c.train.peak_flops = -1.0           # per device; -1 = measure a matmul here (CPU)
  c.mesh = sharding.default_mesh_config()
  c.sharding_rules = tuple(tuple(r) for r in sharding.DEFAULT_RULES)
  # CLM only: continuations of these prompts printed (and appended to samples.txt) at each eval.
  c.samples = ml_collections.ConfigDict(dict(
      prompts=[], max_new_tokens=40, temperature=0.8, top_k=40, top_p=0.95))
  return c


def efficiency_variants() -> dict:
  """Variants shared by both objectives: the speed and memory switches."""
  return {
      "bf16": common.bf16,
      "remat": lambda c: setattr(c.model, "remat", "full"),
      "accum4": lambda c: setattr(c.optim, "accum_steps", 4),
      "quick": _quick,
  }


def _quick(c):
  c.train.num_steps = 40
  c.train.log_every = 10
  c.train.eval_every = 20
  c.train.checkpoint_every = 20
  c.data.eval_batches = 4


def get_config(variant: str = ""):
  c = base("mlm")
  c.model.dropout_rate = 0.0          # no dropout for a short, under-fitted run (as in "cramming")
  return common.apply_variant(c, variant, {
      "minilm": _minilm,
      "wordpiece": lambda c: setattr(c.vocab, "size", 8192),
      "wwm": lambda c: setattr(c.data, "whole_word_masking", True),
      **efficiency_variants(),
  })


def _minilm(c):
  c.model.preset = ""
  c.model.init_from = "minilm"
  c.model.dropout_rate = -1.0         # the checkpoint's (0.1)
  c.data.dataset = "text:conll2003"
  # The MLM head is new (the decoder is the pretrained word embeddings): a 20x learning rate.
  c.peft.rules = (("mlm/.*", "head"), (".*", "train"))
  c.optim.lr = 5e-5
  c.optim.lr_mult = {"head": 20.0}
  c.train.num_steps = 300
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
