"""Tiny model, synthetic batches and a resumable iterator for the training-core tests and their subprocesses."""

import os
import types

import jax
import ml_collections
import numpy as np
import optax

from lib import models, optim, peft, sharding, train
from lib.models import ModelArgs

VOCAB, SEQ = 128, 8


def tiny_args(dropout: float = 0.0) -> ModelArgs:
  return ModelArgs(vocab_size=VOCAB, hidden_size=64, num_layers=1, num_heads=4, mlp_dim=128,
                   max_len=16, dropout_rate=dropout, attention_dropout_rate=dropout)


def synthetic_batch(seed: int, batch_size: int = 16) -> dict:
  """Random token ids with random real lengths (padding masked) and binary labels."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, SEQ + 1, batch_size)
  mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(1, VOCAB, (batch_size, SEQ)).astype(np.int32) * mask
  return dict(input_ids=ids, input_mask=mask, label=rng.integers(0, 2, batch_size).astype(np.int32))


class SyntheticIterator:
  """Batch i is synthetic_batch(seed + i) (rows [start, stop) of it); resumable by index."""

  def __init__(self, seed: int = 0, batch_size: int = 16, rows=None):
    self.seed, self.batch_size, self.rows, self.index = seed, batch_size, rows, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = synthetic_batch(self.seed + self.index, self.batch_size)
    self.index += 1
    if self.rows is not None:
      batch = {k: v[self.rows[0]:self.rows[1]] for k, v in batch.items()}
    return batch

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = int(state["index"])


def make_loss_fn(module):
  """Mean cross-entropy over examples (seq_cls); counts as int metrics."""
  def loss_fn(params, batch, rng, train):
    out, _ = module.apply({"params": params}, input_ids=batch["input_ids"],
                          input_mask=batch["input_mask"], deterministic=not train,
                          rngs={"dropout": rng} if train else {})
    nll = optax.softmax_cross_entropy_with_integer_labels(out["logits"], batch["label"])
    return nll.mean(), {"examples": jax.numpy.asarray(nll.shape[0], jax.numpy.int32)}
  return loss_fn


def optim_config(**overrides) -> ml_collections.ConfigDict:
  cfg = optim.default_config()
  cfg.lr, cfg.warmup_steps, cfg.weight_decay = 1e-3, 2, 0.01
  cfg.update(overrides)
  return cfg


def setup(mesh_shape=(1, 1, 1), devices=None, peft_rules=peft.FULL_FINETUNE, num_steps=20,
          accum_steps=1, dropout=0.0, seed=0, rules=sharding.DEFAULT_RULES, dcn=(1, 1, 1),
          create=True, **optim_overrides):
  """Everything a test needs to train the tiny seq_cls BERT: a namespace of module, mesh, state
  (only the sharded `abstract` state when not `create`)..."""
  module = models.build(tiny_args(dropout), head="seq_cls", num_labels=2)
  abstract, logical = models.abstract_params(module)
  labels = peft.label_params(abstract, peft_rules, log=False)
  tx, schedule = optim.make_optimizer(optim_config(**optim_overrides), labels, num_steps)
  mesh_cfg = dict(zip(sharding.MESH_AXES, mesh_shape))
  mesh_cfg.update({f"dcn_{a}": d for a, d in zip(sharding.MESH_AXES, dcn)})
  mesh = sharding.make_mesh(ml_collections.ConfigDict(mesh_cfg), devices)
  init_fn = lambda r: models.init_params(module, r)[0]
  abstract = train.abstract_train_state(init_fn, tx, mesh, rules, logical, labels)
  state = (train.create_train_state(init_fn, jax.random.key(seed), tx, mesh, rules, logical, labels)
           if create else None)
  step = train.make_train_step(make_loss_fn(module), tx, labels=labels, accum_steps=accum_steps,
                               schedule=schedule, seed=seed)
  return types.SimpleNamespace(
      module=module, logical=logical, labels=labels, tx=tx, schedule=schedule, mesh=mesh,
      rules=rules, init_fn=init_fn, state=state, abstract=abstract, train_step=step,
      batch_sharding=sharding.batch_sharding(mesh, rules))


def eval_step_fn(module):
  """eval_step(state, batch) -> {'loss': mean loss, 'weight': examples} for train.evaluate."""
  loss_fn = make_loss_fn(module)
  def eval_fn(params, batch):
    loss, m = loss_fn(params, batch, None, False)
    return {"loss": loss, "weight": m["examples"]}
  return train.make_eval_step(eval_fn)


EVAL_SEEDS = (100, 101)


def train_config(**overrides) -> ml_collections.ConfigDict:
  cfg = train.default_config()
  cfg.update(dict(log_every=1, eval_every=0, checkpoint_every=0), **overrides)
  return cfg


def write_toy_sentiment(directory) -> str:
  """A learnable toy TSV classification dataset (train 64, dev 16, test 16 rows: the first word,
  'great' or 'awful', decides the label) in `directory`, which is created; returns it."""
  os.makedirs(directory, exist_ok=True)
  words = ["film", "plot", "actor", "scene", "story"]
  for name, n, seed in (("train.tsv", 64, 0), ("dev.tsv", 16, 1), ("test.tsv", 16, 2)):
    rng = np.random.default_rng(seed)
    with open(os.path.join(directory, name), "w") as f:
      f.write("sentence\tlabel\n")
      for _ in range(n):
        good = rng.integers(2)
        f.write(f"{'great' if good else 'awful'} {' '.join(rng.choice(words, 4))}\t"
                f"{'pos' if good else 'neg'}\n")
  return str(directory)
