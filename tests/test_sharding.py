"""Mesh, logical-axis rules and shardings (lib/sharding.py) on 8 simulated CPU devices."""

import functools

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lib import sharding, train
from training_helpers import setup, synthetic_batch

RULES = sharding.DEFAULT_RULES


def _mesh(**kw):
  cfg = sharding.default_mesh_config()
  cfg.update(kw)
  return sharding.make_mesh(cfg)


def test_make_mesh_fills_minus_one_and_checks_sizes():
  assert dict(_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert dict(_mesh(data=2, fsdp=-1, tensor=2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    _mesh(data=-1, fsdp=-1)
  with pytest.raises(ValueError, match="needs 6 devices, have 8"):
    _mesh(data=3, fsdp=2, tensor=1)
  with pytest.raises(ValueError, match="not divisible by 3"):
    _mesh(data=-1, tensor=3)
  # One process here: a DCN (multi-slice) shape of 2 has only one granule to use.
  with pytest.raises(ValueError, match="needs 2 slices/processes, found 1"):
    _mesh(data=-1, dcn_data=2)


def test_logical_to_mesh_rules():
  mesh = _mesh(data=2, fsdp=2, tensor=2)
  assert sharding.logical_to_mesh(P("embed", "heads", "head_dim"), RULES) == P("fsdp", "tensor", None)
  assert sharding.logical_to_mesh(P("batch", "length"), RULES) == P(("data", "fsdp"), None)
  # A mesh axis serves one dimension only: the second 'embed' is replicated.
  assert sharding.logical_to_mesh(P("embed", "embed"), RULES) == P("fsdp", None)
  # Not divisible by the mesh axis size: replicated (and logged), not an XLA error later.
  assert sharding.logical_to_mesh(P("vocab", "embed"), RULES, (7, 32), mesh) == P(None, "fsdp")
  with pytest.raises(ValueError, match="enc/w: logical axis 'experts' has no sharding rule"):
    sharding.logical_to_mesh(P("experts"), RULES, path="enc/w")
  with pytest.raises(ValueError, match="unknown mesh axes"):
    sharding.logical_to_mesh(P("embed"), [("embed", "model")])


def test_batch_sharding_and_process_rows():
  mesh = _mesh(data=2, fsdp=2, tensor=2)
  bs = sharding.batch_sharding(mesh, RULES)
  assert bs.spec == P(("data", "fsdp"))
  assert sharding.process_batch_range(bs, 16) == (0, 16)   # one process loads every row
  batch = synthetic_batch(0, 16)
  placed = sharding.shard_batch(batch, bs)
  assert placed["input_ids"].sharding.shard_shape((16, 8)) == (4, 8)
  np.testing.assert_array_equal(np.asarray(placed["input_ids"]), batch["input_ids"])
  with pytest.raises(ValueError, match="batch\\['step'\\] is a scalar"):
    sharding.shard_batch(dict(batch, step=np.int32(3)), bs)


@functools.lru_cache(maxsize=None)
def _one_step(mesh_shape):
  """Loss, host params and per-device argument bytes of one train step on a mesh."""
  devices = None if np.prod(mesh_shape) == 8 else jax.devices()[:1]
  s = setup(mesh_shape, devices=devices, warmup_steps=0, schedule="constant")
  batch = sharding.shard_batch(synthetic_batch(0, 16), s.batch_sharding)
  compiled = train.jit_train_step(s.train_step, s.state, s.batch_sharding).lower(
      s.state, batch).compile()
  batch_bytes = sum(x.sharding.shard_shape(x.shape)[0] * np.prod(x.shape[1:]) * x.dtype.itemsize
                    for x in batch.values())
  args = compiled.memory_analysis().argument_size_in_bytes - batch_bytes
  s.initial = train.to_host(s.state.params)
  s.state, metrics = compiled(s.state, batch)
  return float(metrics["loss"]), train.to_host(s.state.params), args, s


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 8, 1)])
def test_one_step_on_mesh_matches_one_device(mesh_shape):
  loss1, params1, _, _ = _one_step((1, 1, 1))
  loss, params, _, _ = _one_step(mesh_shape)
  # Tolerance: float32 with a different reduction order across devices; a wrong sharding or a
  # missing all-reduce is off by far more (a step moves parameters by ~lr = 1e-3).
  assert loss == pytest.approx(loss1, rel=1e-6)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(params1),
                                               jax.tree.leaves(_one_step((1, 1, 1))[3].initial))]
  assert np.median(moved) > 5e-4  # the step did move the parameters (Adam: ~lr each)


def test_fsdp_divides_param_and_optimizer_bytes_by_8():
  _, _, replicated, _ = _one_step((8, 1, 1))
  _, _, fsdp, _ = _one_step((1, 8, 1))
  assert abs(fsdp / (replicated / 8) - 1) < 0.10, (fsdp, replicated)


def test_optimizer_state_follows_parameter_sharding():
  s = _one_step((2, 2, 2))[3]
  specs = {p: x.sharding.spec for p, x in zip(
      [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(s.state.opt_state)[0]],
      jax.tree.leaves(s.state.opt_state))}
  mu_q = [v for k, v in specs.items() if "mu" in k and "layer_0']['attention']['query']['kernel" in k]
  assert mu_q == [P("fsdp", "tensor", None)]
  counts = [v for k, v in specs.items() if k.endswith(".count")]
  assert counts and all(v == P() for v in counts)


def test_explain_sharding_table():
  s = setup((1, 8, 1))
  text = sharding.explain_sharding(s.state.params, opt_state=s.state.opt_state)
  # Abstract state (ShapeDtypeStruct with .sharding, nothing allocated) gives the same table.
  assert sharding.explain_sharding(s.abstract.params, opt_state=s.abstract.opt_state) == text
  lines = text.splitlines()
  row = next(l for l in lines if l.startswith("encoder/layer_0/mlp/mlp_in/kernel "))
  # (32, 64) float32 with embed -> fsdp=8: 4 * 64 * 4 bytes per device.
  assert "(64, 128)" in row and "P('fsdp', 'tensor')" in row and row.endswith("4,096")
  n = len(jax.tree.leaves(s.state.params))
  assert len(lines) == 2 + n + 2
  assert lines[0] == "mesh {'data': 1, 'fsdp': 8, 'tensor': 1} (8 devices)"
  total = sum(x.size * 4 for x in jax.tree.leaves(s.state.params))
  assert f"{n} arrays, {total:,} bytes total" in lines[-2]


def test_train_state_from_host_params_is_placed_by_the_rules():
  s = setup((2, 2, 2), create=False)
  rng = np.random.default_rng(0)
  host = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), s.abstract.params)
  state = train.train_state_from_params(host, s.tx, s.mesh, s.rules, s.logical, s.labels)
  assert int(state.step) == 0
  for x, a, h in zip(jax.tree.leaves(state.params), jax.tree.leaves(s.abstract.params),
                     jax.tree.leaves(host)):
    assert x.sharding == a.sharding
    np.testing.assert_array_equal(np.asarray(x), h)
  for x, a in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(s.abstract.opt_state)):
    assert x.sharding == a.sharding and not np.asarray(x).any()  # Adam moments and counts start at 0
