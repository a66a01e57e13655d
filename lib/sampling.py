"""Text generation from a causal LM: greedy and temperature / top-k / top-p sampling, per-row keys.

The sampler is a pure `fn(params, batch)` (a fixed-shape lax loop), compiled by lib.train like any
eval step; `generate` is the host-side wrapper (tokenise, batch, decode). Row i's randomness is
fold_in(key(seed), i) folded with the step, so a row's sample does not depend on the rest of the
batch.
"""

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lib import sharding, train
from lib.tasks import common


@dataclasses.dataclass(frozen=True)
class SampleArgs:
  """How to pick each next token. temperature <= 0 means greedy (argmax); top_k = 0 and
  top_p = 1 switch those filters off."""
  max_new_tokens: int = 32
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  @property
  def greedy(self) -> bool:
    return self.temperature <= 0


def filter_logits(logits, top_k: int = 0, top_p: float = 1.0):
  """Sets to -inf every logit outside the top-k and outside the nucleus of probability top_p.

  Args:
    logits: (..., V) float.
    top_k: keep exactly the k largest (ties go to the lower id, as argmax); 0 = all.
    top_p: keep the smallest set of largest-probability tokens whose mass reaches top_p (the top
      token always stays); 1 = all.
  """
  neg = jnp.full_like(logits, -jnp.inf)
  if top_k:
    _, idx = jax.lax.top_k(logits, top_k)                                   # (..., k)
    keep = jnp.zeros(logits.shape, bool)
    keep = jnp.put_along_axis(keep, idx, True, axis=-1, inplace=False)
    logits = jnp.where(keep, logits, neg)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)                                   # descending
    probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs                             # mass above each token
    keep_sorted = before < top_p
    keep = jnp.put_along_axis(jnp.zeros(logits.shape, bool), order, keep_sorted, axis=-1,
                              inplace=False)
    logits = jnp.where(keep, logits, neg)
  return logits


def next_token(logits, key, sample: SampleArgs):
  """One token id from (V,) logits: argmax, or a draw from the filtered, tempered distribution."""
  if sample.greedy:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  logits = filter_logits(logits.astype(jnp.float32) / sample.temperature, sample.top_k,
                         sample.top_p)
  return jax.random.categorical(key, logits).astype(jnp.int32)


def make_sample_fn(module, sample: SampleArgs):
  """Pure `fn(params, batch) -> (B, L) ids`: prompts continued by `max_new_tokens` tokens.

  batch: input_ids (B, L) (prompt left-aligned, the rest any id), prompt_len (B,) >= 1, and
  key (B, 2) uint32 (`jax.random.key_data` of each row's key). Each step runs the model on the
  whole (B, L) buffer: causal attention keeps positions <= t blind to what is written after.
  """
  def fn(params, batch):
    ids, plen = batch["input_ids"], batch["prompt_len"]
    if ids.shape[1] > module.args.max_len:
      raise ValueError(f"prompt + max_new_tokens = {ids.shape[1]} tokens exceeds the model's "
                       f"max_len {module.args.max_len}")
    keys = jax.vmap(jax.random.wrap_key_data)(batch["key"])
    rows = jnp.arange(ids.shape[0])

    def body(s, ids):
      out, _ = common.apply_model(module, params, {"input_ids": ids})
      pos = plen - 1 + s                                                    # (B,) last known token
      logits = out["logits"][rows, pos]                                     # (B, V)
      step_keys = jax.vmap(lambda k: jax.random.fold_in(k, s))(keys)
      tok = jax.vmap(lambda lg, k: next_token(lg, k, sample))(logits, step_keys)
      return ids.at[rows, pos + 1].set(tok)
    return jax.lax.fori_loop(0, sample.max_new_tokens, body, ids)
  return fn


def prompt_batch(prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, seed: int,
                 pad_id: int, rows_multiple: int = 1) -> dict:
  """Host batch for `make_sample_fn`: prompts left-aligned in a (B, max prompt + new) buffer.

  Rows are padded to a multiple of `rows_multiple` (the data-parallel devices) with copies of the
  last prompt. Raises ValueError for an empty prompt.
  """
  empty = [i for i, p in enumerate(prompt_ids) if not len(p)]
  if empty:
    raise ValueError(f"prompts {empty} are empty after tokenisation: give at least one token")
  n = len(prompt_ids)
  rows = -(-n // rows_multiple) * rows_multiple
  prompts = list(prompt_ids) + [prompt_ids[-1]] * (rows - n)
  length = max(len(p) for p in prompts) + max_new_tokens
  ids = np.full((rows, length), pad_id, np.int32)
  for i, p in enumerate(prompts):
    ids[i, :len(p)] = p
  base = jax.random.key(seed)
  keys = np.stack([np.asarray(jax.random.key_data(jax.random.fold_in(base, i)))
                   for i in range(rows)]).astype(np.uint32)
  return {"input_ids": ids, "prompt_len": np.array([len(p) for p in prompts], np.int32),
          "key": keys}


def continuations(ids, prompt_len, max_new_tokens: int, eos_id: Optional[int]) -> list:
  """The generated ids of each row, cut before the first end-of-text token."""
  out = []
  for row, p in zip(np.asarray(ids), np.asarray(prompt_len)):
    new = list(row[p:p + max_new_tokens])
    if eos_id is not None and eos_id in new:
      new = new[:new.index(eos_id)]
    out.append(new)
  return out


def generate(sample_step, state, tokenizer, prompts: Sequence[str], sample: SampleArgs,
             batch_sharding, seed: int = 0) -> list:
  """Continues each prompt; returns the generated texts (without the prompts).

  Args:
    sample_step: `train.make_eval_step(make_sample_fn(module, sample))`, made once per run (it
      is compiled once and cached by identity).
    state: a TrainState or `train.Weights` (inference) holding the params.
    tokenizer: the model's tokenizer (GPT-2 BPE or a trained one).
    prompts: texts to continue.
    sample: the SampleArgs the step was made with.
    batch_sharding: from `sharding.batch_sharding`; rows are padded to its batch shards.
    seed: prompt i draws with fold_in(key(seed), i).
  """
  ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
  spec = batch_sharding.spec[0] if batch_sharding.spec else None
  axes = () if spec is None else spec if isinstance(spec, tuple) else (spec,)
  shards = int(np.prod([batch_sharding.mesh.shape[a] for a in axes]))
  full = prompt_batch(ids, sample.max_new_tokens, seed, _pad_id(tokenizer), shards)
  start, stop = sharding.process_batch_range(batch_sharding, len(full["input_ids"]))
  local = {k: v[start:stop] for k, v in full.items()}
  (_, out), = list(train.predict(sample_step, state, [local], batch_sharding))
  new = continuations(out, full["prompt_len"], sample.max_new_tokens, tokenizer.eos_token_id)
  return [tokenizer.decode(n) for n in new[:len(prompts)]]


def _pad_id(tokenizer) -> int:
  return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
