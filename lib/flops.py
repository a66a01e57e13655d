"""Model FLOPs and utilisation: the one training FLOPs formula, a model's FLOPs per token, the
measured matmul peak of this device and XLA's own cost analysis."""

import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from lib import optim, tree


def train_flops_per_token(num_params: int, num_layers: int, hidden_size: int, seq_len: int,
                          num_trainable: Optional[int] = None,
                          attention_width: Optional[int] = None) -> float:
  """Training FLOPs per token: 2N forward + 2N backward to activations + 2N_trainable backward
  to weights, plus attention scores and mixing 12 * L * D * T (forward + backward; causal
  masking not discounted). With everything trainable this is PaLM's 6N + 12LDT.

  num_params should count the parameters used in matmuls (leave out position/token-type
  tables; count the word embedding only where it is also the output layer).
  attention_width: the layers' attention widths summed (heads x head_dim per layer) where heads
  were pruned; default L * D.
  """
  n_tr = num_params if num_trainable is None else num_trainable
  width = num_layers * hidden_size if attention_width is None else attention_width
  return 4.0 * num_params + 2.0 * n_tr + 12.0 * width * seq_len


def model_flops_per_token(args, params, seq_len: int, labels=None,
                          head_fraction: Optional[float] = None) -> float:
  """FLOPs per trained token of a model: every matmul parameter (all but the embedding tables,
  which are gathers), the tied output layer (vocab x embed, for the MLM/LM heads) on
  `head_fraction` of the positions (MLM on its prediction slots only), and attention over rows
  of `seq_len` (over each layer's kept heads after head pruning). With `labels` (lib/peft
  labels), frozen parameters cost no weight gradient.

  Args:
    args: ModelArgs (num_layers, hidden_size, vocab_size).
    params: the parameter tree (arrays or ShapeDtypeStructs).
    seq_len: tokens per row.
    labels: optional label tree of `params`.
    head_fraction: None for heads without a tied decoder; else the share of positions.
  """
  flat = tree.flatten(params)
  matmul = {k: v.size for k, v in flat.items() if not k.endswith("embedding")}
  decoder = 0 if head_fraction is None else head_fraction * args.vocab_size * args.hidden_size
  trainable = None
  if labels is not None:
    lab = tree.flatten(labels)
    trainable = sum(n for k, n in matmul.items() if optim.is_trainable(lab[k])) + decoder
  width = None
  if getattr(args, "heads_per_layer", ()):   # head pruning: each layer attends over its heads only
    width = sum(args.layer_heads(i) * args.head_dim for i in range(args.num_layers))
  return train_flops_per_token(sum(matmul.values()) + decoder, args.num_layers, args.hidden_size,
                               seq_len, trainable, width)


def matmul_peak(n: int = 2048, dtype: str = "float32", reps: int = 5) -> float:
  """FLOP/s of a jitted (n, n) @ (n, n) jnp.dot (bf16 inputs accumulate in f32), best of `reps`."""
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.standard_normal((n, n)), dtype) for _ in range(2))
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


def xla_flops(compiled) -> float:
  """FLOPs of a compiled executable from XLA's cost analysis (0 if unavailable)."""
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float((ca or {}).get("flops", 0.0))
