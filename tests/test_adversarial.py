"""lib/adversarial.py: epsilon 0 is the plain loss and gradient; perturbations stay in their ball;
FGM and FreeLB match hand-written loops; PEFT, gradient accumulation and a sharded jitted step."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import common
from lib import adversarial, errors, models, peft, sharding, train
from lib.tasks import classification, ner

TINY = models.ModelArgs(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, max_len=32,
                        vocab_size=50, dropout_rate=0.1, attention_dropout_rate=0.1)
B, T = 4, 10


def _setup(head="seq_cls"):
  module = models.build(TINY, head, 3)
  params, _ = models.init_params(module, jax.random.key(0))
  rs = np.random.RandomState(0)
  lengths = np.array([10, 7, 4, 9])
  mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
  batch = {"input_ids": jnp.asarray(rs.randint(1, 50, (B, T)) * mask),
           "input_mask": jnp.asarray(mask), "token_type_ids": jnp.zeros((B, T), jnp.int32)}
  if head == "seq_cls":
    batch["label"] = jnp.asarray([0, 1, 2, 1])
    loss_fn = classification.make_loss_fn(module)
  else:
    batch["labels"] = jnp.asarray(np.where(mask == 1, rs.randint(0, 3, (B, T)), -1))
    loss_fn = ner.make_loss_fn(module)
  return module, params, batch, loss_fn


def _acfg(**kw):
  c = adversarial.default_config()
  c.update(kw)
  return c


def _close(a, b, tol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


RNG = jax.random.key(7)


@pytest.mark.slow   # 40-116 s per case on the loaded 2-core machine (MiniLM-sized compiles)
@pytest.mark.parametrize("method,head", [("fgm", "seq_cls"), ("pgd", "token_cls"),
                                         ("freelb", "seq_cls"), ("freelb", "token_cls")])
def test_epsilon_zero_is_the_plain_loss_and_gradient(method, head):
  _, params, batch, loss_fn = _setup(head)
  wrapped = adversarial.wrap(loss_fn, _acfg(method=method, epsilon=0.0, init_scale=0.5),
                             TINY.hidden_size)
  (l0, _), g0 = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, RNG, True)
  (l1, m1), g1 = jax.jit(jax.value_and_grad(wrapped, has_aux=True), static_argnums=3)(
      params, batch, RNG, True)
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  _close(g1, g0)
  assert float(m1["delta_norm"]) == 0.0


@pytest.mark.parametrize("method,positions,norm", [("pgd", "tokens", "l2"),
                                                   ("freelb", "inner", "linf"),
                                                   ("fgm", "inner", "l2"),
                                                   ("pgd", "inner", "linf")])
def test_perturbations_stay_in_the_ball_and_on_the_mask(method, positions, norm):
  _, params, batch, loss_fn = _setup("token_cls")
  eps = 0.05
  acfg = _acfg(method=method, epsilon=eps, step_size=1.0, steps=4, init_scale=5.0, norm=norm,
               positions=positions)
  *_, deltas = adversarial.inner_steps(loss_fn, acfg, params, lambda t: t, batch, RNG,
                                       TINY.hidden_size)
  mask = np.asarray(batch["input_mask"]).copy()
  if positions == "inner":   # first and last real token of each row are never perturbed
    mask[:, 0] = 0
    mask[np.arange(B), mask.sum(1)] = 0
  for d in map(np.asarray, deltas[1:]):
    assert np.abs(d[mask == 0]).max() == 0.0
    size = np.abs(d).max(axis=(1, 2)) if norm == "linf" else np.sqrt((d ** 2).sum(axis=(1, 2)))
    assert (size <= eps * (1 + 1e-5)).all(), size
    assert size.max() > 0.5 * eps   # large steps: the bound is what stops them


def _plain(loss_fn, batch):
  """(params, delta) -> loss with delta on the embeddings, written against the batch key."""
  return lambda p, d: loss_fn(p, dict(batch, embedding_delta=d), RNG, True)[0]


def _l2_unit(g, m):
  g = g * m
  return g / jnp.sqrt((g ** 2).sum(axis=(1, 2), keepdims=True))


def test_fgm_is_the_mean_of_clean_and_adversarial_gradients():
  _, params, batch, loss_fn = _setup()
  f, eps = _plain(loss_fn, batch), 0.7
  m = batch["input_mask"][..., None].astype(jnp.float32)
  zero = jnp.zeros((B, T, TINY.hidden_size))
  r = eps * _l2_unit(jax.grad(f, 1)(params, zero), m)
  want = jax.tree.map(lambda a, b: 0.5 * (a + b), jax.grad(f)(params, zero), jax.grad(f)(params, r))
  got = jax.grad(lambda p: adversarial.wrap(loss_fn, _acfg(method="fgm", epsilon=eps),
                                            TINY.hidden_size)(p, batch, RNG, True)[0])(params)
  _close(got, want)
  plain = jax.grad(f)(params, zero)
  assert max(float(jnp.abs(a - b).max()) for a, b in
             zip(jax.tree.leaves(got), jax.tree.leaves(plain))) > 1e-4   # the seat is live


@pytest.mark.parametrize("init_scale", [0.0, 0.3])
def test_freelb_accumulates_as_the_papers_loop(init_scale):
  """Zhu et al. 2020, Algorithm 1: g += grad_theta L(delta_t) / K; delta += a g_d / ||g_d||,
  projected on the eps-ball; written out here step by step."""
  _, params, batch, loss_fn = _setup("token_cls")
  k, alpha, eps = 3, 0.4, 0.6
  acfg = _acfg(method="freelb", epsilon=eps, step_size=alpha, steps=k, init_scale=init_scale)
  f = _plain(loss_fn, batch)
  m = batch["input_mask"][..., None].astype(jnp.float32)
  delta = adversarial.init_delta(jax.random.fold_in(RNG, 0x5eed), m, TINY.hidden_size, acfg)
  assert (float(jnp.abs(delta).max()) > 0) == (init_scale > 0)
  acc, total = jax.tree.map(jnp.zeros_like, params), 0.0
  for _ in range(k):
    loss, (gp, gd) = jax.value_and_grad(f, (0, 1))(params, delta)
    acc = jax.tree.map(lambda a, g: a + g / k, acc, gp)
    total += loss / k
    delta = delta + alpha * _l2_unit(gd, m)
    norm = jnp.sqrt((delta ** 2).sum(axis=(1, 2), keepdims=True))
    delta = jnp.where(norm > eps, delta * eps / norm, delta)
  wrapped = adversarial.wrap(loss_fn, acfg, TINY.hidden_size)
  (got_loss, _), got = jax.value_and_grad(wrapped, has_aux=True)(params, batch, RNG, True)
  np.testing.assert_allclose(float(got_loss), float(total), rtol=1e-5)
  _close(got, acc)


@pytest.mark.slow
def test_peft_labels_and_accumulation_in_a_sharded_step():
  """Frozen parameters stay untouched; a jitted, sharded step with 2 micro-batches and epsilon 0
  equals the plain loss's step; with epsilon > 0 the update differs."""
  module, params, batch, loss_fn = _setup()
  batch = jax.tree.map(lambda x: jnp.concatenate([x] * 4), batch)   # 16 rows: 8 devices x 2
  labels = peft.label_params(params, [("classifier/.*", "train"), (".*/attention/.*", "train"),
                                      (".*", "freeze")])
  tx = optax.sgd(0.1)
  mesh = sharding.make_mesh(sharding.default_mesh_config())
  rules = [tuple(r) for r in sharding.DEFAULT_RULES]
  _, logical = models.abstract_params(module)

  def one_step(loss):
    state = train.train_state_from_params(jax.device_get(params), tx, mesh, rules, logical, labels)
    step = train.make_train_step(loss, tx, labels=labels, accum_steps=2, seed=3)
    bsh = sharding.batch_sharding(mesh, rules)
    jitted = train.jit_train_step(step, state, bsh)
    new, metrics = jitted(state, sharding.shard_batch(jax.device_get(batch), bsh))
    return jax.device_get(new.params), jax.device_get(metrics)

  plain, _ = one_step(loss_fn)
  zero, _ = one_step(adversarial.wrap(loss_fn, _acfg(method="freelb", epsilon=0.0, init_scale=1.0),
                                      TINY.hidden_size, labels))
  _close(zero, plain)
  adv, metrics = one_step(adversarial.wrap(loss_fn, _acfg(method="pgd", epsilon=1.0),
                                           TINY.hidden_size, labels))
  assert {"adv_loss", "clean_loss", "delta_norm"} <= set(metrics)
  flat_adv, flat_plain = peft.flatten_paths(adv), peft.flatten_paths(plain)
  flat_old, lab = peft.flatten_paths(jax.device_get(params)), peft.flatten_paths(labels)
  for path, label in lab.items():
    if not peft.is_trainable(label):
      np.testing.assert_array_equal(flat_adv[path], flat_old[path])
  assert not np.allclose(flat_adv["classifier/kernel"], flat_plain["classifier/kernel"])


def test_a_loss_that_ignores_the_perturbation_is_refused():
  module, params, batch, _ = _setup()

  def blind(p, b, rng, train_):   # calls the model without embedding_delta
    out, _ = module.apply({"params": p}, b["input_ids"], b["input_mask"])
    return out["logits"].mean(), {}
  wrapped = adversarial.wrap(blind, _acfg(method="fgm"), TINY.hidden_size)
  with pytest.raises(ValueError, match="ignores batch\\['embedding_delta'\\]"):
    wrapped(params, batch, RNG, True)


def test_bad_config_values_are_named():
  with pytest.raises(errors.ConfigError, match=r"adversarial.method='fmg'.*adversarial.steps=0"):
    adversarial.check_config(_acfg(method="fmg", steps=0))


def test_config_variants():
  from configs import ner as ner_config, sst2 as sst2_config
  assert sst2_config.get_config("").adversarial.method == "none"
  for name in ("fgm", "pgd", "freelb"):
    for cfg_mod in (sst2_config, ner_config):
      c = cfg_mod.get_config(f"quick+{name}")
      assert c.adversarial.method == name
      adversarial.check_config(c.adversarial)
  assert set(common.adversarial_variants()) == {"fgm", "pgd", "freelb"}
  assert adversarial.from_config(len, ml_collections.ConfigDict({}), 4) is len
