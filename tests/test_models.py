"""Model structure: parameter-path snapshot per preset, masks, remat, dtype, preset errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from lib import models
from lib.models import heads, layers

SNAPSHOT = os.path.join(os.path.dirname(__file__), "snapshots", "param_paths.json")
HEADS = {"bert": [None, "mlm", "token_cls", "seq_cls"],
         "gpt2": [None, "lm", "token_cls", "seq_cls"]}


def _paths(preset, head):
  module = models.build(common.model_config(preset), head, num_labels=3)
  shapes, specs = models.abstract_params(module)
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  leaves = jax.tree_util.tree_leaves(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  return {"/".join(k.key for k in path): [list(v.shape), list(s)]
          for (path, v), s in zip(flat, leaves)}


def current_snapshot():
  """Every preset bare, plus every head on the tiny presets (heads do not depend on size)."""
  snap = {f"{p}:None": _paths(p, None) for p in common.PRESETS}
  for p in ("bert-tiny", "gpt2-tiny"):
    snap.update({f"{p}:{h}": _paths(p, h) for h in HEADS[common.PRESETS[p]["arch"]]})
  return snap


def test_param_paths_snapshot():
  """Parameter names, shapes and logical axes are a public interface (PEFT rules, HF maps)."""
  with open(SNAPSHOT) as f:
    want = json.load(f)
  got = current_snapshot()
  assert sorted(got) == sorted(want)
  for key in want:
    assert got[key] == want[key], f"{key}: parameter paths/shapes/axes changed"


def test_unknown_preset_lists_valid():
  with pytest.raises(ValueError, match="bert-tiny.*gpt2-medium|valid presets"):
    common.model_config("bert-huge")


def _tiny(**kw):
  return models.ModelArgs(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32,
                          max_len=32, **kw)


def test_padding_does_not_change_real_positions():
  args = _tiny()
  m = models.build(args, "token_cls", 3)
  p, _ = models.init_params(m, jax.random.key(1))
  ids = jnp.arange(1, 7)[None]
  short, _ = m.apply({"params": p}, input_ids=ids, input_mask=jnp.ones_like(ids))
  padded_ids = jnp.concatenate([ids, jnp.full((1, 4), 9)], 1)
  mask = jnp.concatenate([jnp.ones((1, 6), jnp.int32), jnp.zeros((1, 4), jnp.int32)], 1)
  long, _ = m.apply({"params": p}, input_ids=padded_ids, input_mask=mask)
  np.testing.assert_allclose(long["logits"][:, :6], short["logits"], atol=1e-6)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_segments_equal_separate_documents(arch):
  """A packed row with two segments gives the same hidden states as the two documents alone."""
  args = _tiny(arch=arch, type_vocab_size=2 if arch == "bert" else 0)
  m = models.build(args, None)
  p, _ = models.init_params(m, jax.random.key(2))
  a, b = jnp.array([[3, 4, 5, 6]]), jnp.array([[7, 8, 9]])
  row = jnp.concatenate([a, b, jnp.zeros((1, 1), jnp.int32)], 1)
  seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 0]])
  pos = jnp.array([[0, 1, 2, 3, 0, 1, 2, 0]])
  packed, _ = m.apply({"params": p}, input_ids=row, input_mask=(seg > 0).astype(jnp.int32),
                      segment_ids=seg, position_ids=pos)
  for doc, sl in [(a, slice(0, 4)), (b, slice(4, 7))]:
    alone, _ = m.apply({"params": p}, input_ids=doc, input_mask=jnp.ones_like(doc))
    np.testing.assert_allclose(packed["last_hidden_state"][:, sl], alone["last_hidden_state"],
                               atol=1e-5)


def test_gpt_is_causal():
  m = models.build(_tiny(arch="gpt2", type_vocab_size=0), "lm")
  p, _ = models.init_params(m, jax.random.key(3))
  x = jnp.array([[1, 2, 3, 4, 5]])
  y = x.at[0, 4].set(9)
  o1, _ = m.apply({"params": p}, input_ids=x)
  o2, _ = m.apply({"params": p}, input_ids=y)
  np.testing.assert_array_equal(o1["logits"][:, :4], o2["logits"][:, :4])
  assert not np.allclose(o1["logits"][:, 4], o2["logits"][:, 4])


@pytest.mark.slow
def test_remat_same_gradients_and_bf16_close():
  ids = jnp.array([[1, 2, 3, 4, 5, 6]])

  def grads(**kw):
    m = models.build(_tiny(**kw), "mlm")
    p, _ = models.init_params(m, jax.random.key(4))
    logits = lambda p: m.apply({"params": p}, input_ids=ids)[0]["logits"]
    loss = lambda p: jnp.mean(logits(p).astype(jnp.float32) ** 2)
    return jax.grad(loss)(p), loss(p)

  g0, l0 = grads()
  for policy in ("full", "dots"):
    g1, _ = grads(remat=policy)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)
  _, lb = grads(dtype="bfloat16")
  assert abs(float(lb) - float(l0)) / float(l0) < 2e-2  # bf16 has an 8-bit mantissa


def test_dropout_uses_rng():
  m = models.build(_tiny(), "token_cls", 2)
  p, _ = models.init_params(m, jax.random.key(5))
  ids = jnp.array([[1, 2, 3, 4]])
  run = lambda k: m.apply({"params": p}, input_ids=ids, deterministic=False, rngs={"dropout": k})[0]
  a, b, c = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
  np.testing.assert_array_equal(a["logits"], b["logits"])
  assert not np.allclose(a["logits"], c["logits"])


def _regression_head(h):
  """A toy head from outside lib: one number per row from the model's pooled summary."""
  pooled = h.pool()                                                     # (B, D)
  y = layers.dense(h.args, 1, ("embed", None), (None,), "regressor")(pooled, h.deterministic)
  return {"pooled": pooled, "logits": y[:, 0]}                          # (B,)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_registered_head_builds_and_runs(arch):
  heads.register_head("toy_regression", _regression_head)
  try:
    m = models.build(_tiny(arch=arch), "toy_regression")
    p, _ = models.init_params(m, jax.random.key(6))
    ids, mask = jnp.array([[1, 2, 3, 4], [5, 6, 0, 0]]), jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    out, _ = m.apply({"params": p}, input_ids=ids, input_mask=mask)
  finally:
    del heads.HEADS["toy_regression"]
  assert out["logits"].shape == (2,)
  assert p["regressor"]["kernel"].shape == (16, 1)
  want = np.asarray(out["pooled"]) @ np.asarray(p["regressor"]["kernel"])[:, 0]
  np.testing.assert_allclose(out["logits"], want + float(p["regressor"]["bias"][0]), atol=1e-6)
  if arch == "gpt2":   # GPT-2 pools the last real token: row 1 ends at position 1
    np.testing.assert_array_equal(out["pooled"][1], out["last_hidden_state"][1, 1])


def test_unknown_head_lists_registered():
  with pytest.raises(ValueError, match="unknown model head 'probe'; registered:") as e:
    models.build(_tiny(), "probe")
  assert all(repr(h) in str(e.value) for h in ("lm", "mlm", "seq_cls", "token_cls"))
  with pytest.raises(ValueError, match="already registered"):
    heads.register_head("seq_cls", _regression_head)


if __name__ == "__main__":  # regenerate: python tests/test_models.py (review the diff!)
  os.makedirs(os.path.dirname(SNAPSHOT), exist_ok=True)
  with open(SNAPSHOT, "w") as f:
    snap = current_snapshot()
    f.write("{\n" + ",\n".join(
        f"{json.dumps(k)}: {{\n" + ",\n".join(f"  {json.dumps(p)}: {json.dumps(v)}" for p, v in sorted(snap[k].items())) + "}"
        for k in sorted(snap)) + "\n}\n")
