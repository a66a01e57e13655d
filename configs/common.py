"""Model size presets and shared config pieces (mesh, logical-axis rules)."""

import os

import ml_collections

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Real data lives beside the repository, never inside it.
DATA_DIR = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")

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
    ValueError: unknown preset, listing the valid ones.
  """
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; valid presets: {sorted(PRESETS)}")
  cfg = ml_collections.ConfigDict(dict(PRESETS[name]))
  cfg.preset = name
  cfg.dtype = "float32"        # compute dtype (e.g. "bfloat16" on GPU/TPU)
  cfg.param_dtype = "float32"  # storage dtype of the parameters
  cfg.remat = "none"           # none | full | dots (per-layer nn.remat policy)
  return cfg
