"""lib/prune.py: head importance and physical head removal; unstructured masks and schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from lib import model_io, models, prune
from lib.models import ModelArgs

BASE = dict(vocab_size=60, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, max_len=32,
            dropout_rate=0.0, attention_dropout_rate=0.0)
ATT = "encoder/layer_{}/attention/{}/{}"


def _model(arch="bert", head="seq_cls", num_labels=3, seed=0):
  args = ModelArgs(arch=arch, **BASE)
  params, _ = models.init_params(models.build(args, head, num_labels), jax.random.key(seed))
  # Random biases too (a zero query/key bias would hide a wrongly sliced bias), and kernels 10x
  # the init scale, so that heads change the logits by far more than the tolerance.
  flat = traverse_util.flatten_dict(params, sep="/")
  keys = jax.random.split(jax.random.key(seed + 1), len(flat))
  flat = {p: (0.1 * jax.random.normal(k, v.shape) if p.endswith("bias") else
              10 * v if p.endswith("kernel") else v) for k, (p, v) in zip(keys, flat.items())}
  return args, jax.tree.map(np.asarray, traverse_util.unflatten_dict(flat, sep="/"))


def _batch(seed=0, b=3, t=7):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, BASE["vocab_size"], (b, t)).astype(np.int32)
  mask = np.ones((b, t), np.int32)
  mask[0, 5:] = 0
  return dict(input_ids=ids, input_mask=mask, label=rng.integers(0, 3, (b,)).astype(np.int32))


def _logits(args, params, batch, head="seq_cls", num_labels=3):
  out, _ = models.build(args, head, num_labels).apply(
      {"params": params}, input_ids=jnp.asarray(batch["input_ids"]),
      input_mask=jnp.asarray(batch["input_mask"]))
  return np.asarray(out["logits"])


def _zero_values(params, keep):
  """The masked model built another way: a removed head's value kernel and bias are zero, so
  its context vector is zero (independent of prune's out-kernel scaling)."""
  flat = dict(traverse_util.flatten_dict(params, sep="/"))
  for layer, k in enumerate(keep):
    drop = [h for h in range(BASE["num_heads"]) if h not in k]
    for leaf, axis in (("kernel", 1), ("bias", 0)):
      v = np.array(flat[ATT.format(layer, "value", leaf)])
      v[(slice(None),) * axis + (drop,)] = 0.0
      flat[ATT.format(layer, "value", leaf)] = v
  return traverse_util.unflatten_dict(flat, sep="/")


KEEP = ((0, 2, 3), (1,))


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_pruned_model_equals_masked_model(arch):
  args, params = _model(arch)
  batch = _batch()
  pruned, pargs = prune.prune_heads(params, args, KEEP)
  assert pargs.heads_per_layer == (3, 1)
  root = models.BACKBONE[arch]
  assert pruned[root]["layer_1"]["attention"]["query"]["kernel"].shape == (32, 1, 8)
  assert pruned[root]["layer_0"]["attention"]["out"]["kernel"].shape == (3, 8, 32)
  got = _logits(pargs, pruned, batch)
  masked = _logits(args, prune.mask_heads(params, args, KEEP), batch)
  np.testing.assert_allclose(got, masked, atol=1e-5, rtol=0)
  if arch == "bert":
    np.testing.assert_allclose(got, _logits(args, _zero_values(params, KEEP), batch), atol=1e-5)
  assert np.abs(got - _logits(args, params, batch)).max() > 1e-3   # pruning changed something


@pytest.mark.slow
def test_head_importance_is_the_abs_mask_gradient():
  args, params = _model()
  module = models.build(args, "seq_cls", 3)

  def loss(p, b):
    logits = module.apply({"params": p}, input_ids=b["input_ids"], input_mask=b["input_mask"])[0]
    logp = jax.nn.log_softmax(logits["logits"])
    return -jnp.mean(jnp.take_along_axis(logp, b["label"][:, None], 1))
  batches = [_batch(0), _batch(1)]
  got = prune.head_importance(loss, params, args, batches, normalize=False)

  # Reference: the mask as a scale of each head's value kernel and bias (the context vector is
  # linear in them), differentiated per batch; |.| per batch, summed.
  def masked_loss(xi, b):
    flat = dict(traverse_util.flatten_dict(params, sep="/"))
    for layer in range(2):
      for leaf, shape in (("kernel", (1, -1, 1)), ("bias", (-1, 1))):
        path = ATT.format(layer, "value", leaf)
        flat[path] = flat[path] * xi[layer].reshape(shape)
    return loss(traverse_util.unflatten_dict(flat, sep="/"), b)
  ref = jax.jit(jax.grad(masked_loss))
  want = sum(np.abs(np.stack(ref(jnp.ones((2, 4)), b))) for b in batches)
  np.testing.assert_allclose(np.stack(got), want, rtol=1e-4, atol=1e-7)
  normed = prune.head_importance(loss, params, args, batches)
  np.testing.assert_allclose(np.linalg.norm(np.stack(normed), axis=1), [1.0, 1.0], rtol=1e-6)


def test_heads_to_keep_by_hand():
  imp = [np.array([0.5, 0.1, 0.9]), np.array([0.2, 0.05, 0.3])]
  # Remove 3 of 6, globally lowest: 0.05 (l1 h1), 0.1 (l0 h1), 0.2 (l1 h0).
  assert prune.heads_to_keep(imp, 0.5) == ((0, 2), (2,))
  # 4 of 6 with one per layer kept: l1 keeps its best (h2) and l0 loses h1 then h0.
  assert prune.heads_to_keep(imp, 4 / 6) == ((2,), (2,))
  assert prune.heads_to_keep(imp, 0.0) == ((0, 1, 2), (0, 1, 2))
  with pytest.raises(ValueError, match="cannot remove 5 of 6"):
    prune.heads_to_keep(imp, 5 / 6)
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    prune.heads_to_keep(imp, 1.0)


def test_bad_keep_and_bad_heads_per_layer_raise():
  args, params = _model()
  with pytest.raises(ValueError, match="non-empty lists"):
    prune.prune_heads(params, args, ((0,), ()))
  with pytest.raises(ValueError, match="non-empty lists"):
    prune.prune_heads(params, args, ((0, 4), (1,)))
  with pytest.raises(ValueError, match="heads_per_layer"):
    ModelArgs(**dict(BASE, heads_per_layer=(4, 0)))
  with pytest.raises(ValueError, match="heads_per_layer"):
    ModelArgs(**dict(BASE, heads_per_layer=(4,)))


def test_pruned_model_dir_round_trips(tmp_path):
  args, params = _model()
  pruned, pargs = prune.prune_heads(params, args, KEEP)
  path = str(tmp_path / "pruned")
  model_io.save_model_dir(path, pargs, pruned, "seq_cls", 3, ["a", "b", "c"])
  loaded = model_io.load_model(path, "seq_cls", 3)
  assert loaded.args.heads_per_layer == (3, 1)
  batch = _batch()
  np.testing.assert_array_equal(_logits(loaded.args, loaded.params, batch),
                                _logits(pargs, pruned, batch))
  # Pruning a pruned model again indexes its current heads.
  again, aargs = prune.prune_heads(loaded.params, loaded.args, ((0, 2), (0,)))
  np.testing.assert_allclose(_logits(aargs, again, batch),
                             _logits(args, prune.mask_heads(params, args, ((0, 3), (1,))), batch),
                             atol=1e-5)


@pytest.mark.slow
def test_pruned_model_exports_to_hf_with_matching_logits(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from lib import hf
  args, params = _model()
  pruned, pargs = prune.prune_heads(params, args, KEEP)
  out = hf.export_checkpoint(pruned, pargs, str(tmp_path / "hf"), "seq_cls", 3)
  ref, info = transformers.BertForSequenceClassification.from_pretrained(
      out, output_loading_info=True, attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  batch = _batch()
  with torch.no_grad():
    want = ref.eval()(input_ids=torch.from_numpy(batch["input_ids"]).long(),
                      attention_mask=torch.from_numpy(batch["input_mask"]).long()).logits
  np.testing.assert_allclose(_logits(pargs, pruned, batch), want.numpy(), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------- FFN neurons

MLP = "{}/layer_{}/mlp/{}"
NKEEP = (tuple(range(0, 64, 3)), (5, 9, 63))   # 22 of 64 and 3 of 64 neurons


def _zero_inputs(params, keep, root="encoder"):
  """The neuron-masked model built another way: a removed neuron's mlp_in column and bias are
  zero, so its pre-activation is 0 and gelu(0) = 0 (independent of prune's mlp_out scaling)."""
  flat = dict(traverse_util.flatten_dict(params, sep="/"))
  for layer, k in enumerate(keep):
    drop = [f for f in range(BASE["mlp_dim"]) if f not in k]
    for leaf in ("kernel", "bias"):
      v = np.array(flat[MLP.format(root, layer, "mlp_in/" + leaf)])
      v[..., drop] = 0.0
      flat[MLP.format(root, layer, "mlp_in/" + leaf)] = v
  return traverse_util.unflatten_dict(flat, sep="/")


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_neuron_pruned_model_equals_masked_model(arch):
  args, params = _model(arch)
  batch = _batch()
  pruned, pargs = prune.prune_neurons(params, args, NKEEP)
  assert pargs.mlp_per_layer == (22, 3) and pargs.mlp_dim == 64
  root = models.BACKBONE[arch]
  assert pruned[root]["layer_0"]["mlp"]["mlp_in"]["kernel"].shape == (32, 22)
  assert pruned[root]["layer_1"]["mlp"]["mlp_in"]["bias"].shape == (3,)
  assert pruned[root]["layer_1"]["mlp"]["mlp_out"]["kernel"].shape == (3, 32)
  got = _logits(pargs, pruned, batch)
  np.testing.assert_allclose(got, _logits(args, _zero_inputs(params, NKEEP, root), batch),
                             atol=1e-5, rtol=0)
  np.testing.assert_allclose(got, _logits(args, prune.mask_neurons(params, args, NKEEP), batch),
                             atol=1e-5, rtol=0)
  assert np.abs(got - _logits(args, params, batch)).max() > 1e-3   # pruning changed something
  # Heads and neurons together: the two removals touch different kernels.
  both, bargs = prune.prune_heads(pruned, pargs, KEEP)
  want = _logits(args, prune.mask_heads(_zero_inputs(params, NKEEP, root), args, KEEP), batch)
  np.testing.assert_allclose(_logits(bargs, both, batch), want, atol=1e-5, rtol=0)


def test_neuron_importance_matches_finite_differences():
  args, params = _model()
  module = models.build(args, "seq_cls", 3)

  def loss(p, b):
    logits = module.apply({"params": p}, input_ids=b["input_ids"], input_mask=b["input_mask"])[0]
    logp = jax.nn.log_softmax(logits["logits"].astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, b["label"][:, None], 1))
  batches = [_batch(0), _batch(1)]
  got = prune.mask_importance(loss, params, args, batches, ("heads", "neurons"), normalize=False)
  heads = prune.head_importance(loss, params, args, batches, normalize=False)
  np.testing.assert_allclose(np.stack(got["heads"]), np.stack(heads), rtol=1e-5)
  # Reference: central differences of the loss in the scale of one neuron's output (its mlp_out
  # row, scaled in numpy), |.| per batch, summed.
  flat = _flat(params)
  eps = 1e-2
  for layer, f in ((0, 7), (1, 40), (1, 2)):
    path = MLP.format("encoder", layer, "mlp_out/kernel")
    want = 0.0
    for b in batches:
      diffs = []
      for sign in (1, -1):
        w = flat[path].copy()
        w[f] *= 1 + sign * eps
        diffs.append(float(loss(traverse_util.unflatten_dict(dict(flat, **{path: w}), sep="/"),
                                b)))
      want += abs(diffs[0] - diffs[1]) / (2 * eps)
    assert got["neurons"][layer][f] == pytest.approx(want, rel=2e-2, abs=1e-5)
  normed = prune.neuron_importance(loss, params, args, batches)
  np.testing.assert_allclose(np.linalg.norm(np.stack(normed), axis=1), [1.0, 1.0], rtol=1e-6)
  assert len(normed[0]) == 64


def test_neurons_to_keep_and_bad_neuron_args_raise():
  imp = [np.array([0.5, 0.1, 0.9, 0.4]), np.array([0.2, 0.05])]
  assert prune.neurons_to_keep(imp, 0.5) == ((0, 2), (0,))   # drop .05 .1 .2 (3 of 6)
  with pytest.raises(ValueError, match="cannot remove 5 of 6 neurons"):
    prune.neurons_to_keep(imp, 5 / 6)
  args, params = _model()
  with pytest.raises(ValueError, match="non-empty lists of neuron"):
    prune.prune_neurons(params, args, ((0,), ()))
  with pytest.raises(ValueError, match="non-empty lists of neuron"):
    prune.prune_neurons(params, args, ((0,), (64,)))
  with pytest.raises(ValueError, match="mlp_per_layer"):
    ModelArgs(**dict(BASE, mlp_per_layer=(64, 65)))
  with pytest.raises(ValueError, match="mlp_per_layer"):
    ModelArgs(**dict(BASE, mlp_per_layer=(64,)))


def test_neuron_pruned_model_dir_round_trips(tmp_path):
  args, params = _model()
  pruned, pargs = prune.prune_neurons(params, args, NKEEP)
  path = str(tmp_path / "pruned")
  model_io.save_model_dir(path, pargs, pruned, "seq_cls", 3, ["a", "b", "c"])
  loaded = model_io.load_for_inference(path, data_dir="")
  assert loaded.args.mlp_per_layer == (22, 3)
  batch = _batch()
  got = loaded.module.apply({"params": loaded.params}, input_ids=batch["input_ids"],
                            input_mask=batch["input_mask"])[0]["logits"]
  np.testing.assert_array_equal(np.asarray(got), _logits(pargs, pruned, batch))


@pytest.mark.slow
def test_heads_and_neurons_pruned_model_exports_to_hf_with_matching_logits(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from lib import hf
  args, params = _model()
  pruned, pargs = prune.prune_neurons(params, args, NKEEP)
  pruned, pargs = prune.prune_heads(pruned, pargs, KEEP)
  out = hf.export_checkpoint(pruned, pargs, str(tmp_path / "hf"), "seq_cls", 3)
  ref, info = transformers.BertForSequenceClassification.from_pretrained(
      out, output_loading_info=True, attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert ref.config.intermediate_size == 64
  batch = _batch()
  with torch.no_grad():
    want = ref.eval()(input_ids=torch.from_numpy(batch["input_ids"]).long(),
                      attention_mask=torch.from_numpy(batch["input_mask"]).long()).logits
  got = _logits(pargs, pruned, batch)
  np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0)
  assert np.abs(got - _logits(args, params, batch)).max() > 1e-3
  # And back: importing the export gives the padded (unpruned-shape) model, same logits.
  back = model_io.load_model(out, "seq_cls", 3)
  assert back.args.mlp_per_layer == () and back.args.heads_per_layer == ()
  np.testing.assert_allclose(_logits(back.args, back.params, batch), got, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------- unstructured masks

def test_cubic_schedule_by_hand():
  s = lambda t: float(prune.cubic_sparsity(t, 0.8, 10, 20))
  assert s(0) == 0.0 and s(10) == 0.0
  assert s(15) == pytest.approx(0.8 - 0.8 * 0.5 ** 3)   # 0.7
  assert s(20) == pytest.approx(0.8) and s(99) == pytest.approx(0.8)
  assert float(prune.cubic_sparsity(4, 0.5, 5, 5)) == 0.0   # begin == end: a step change
  assert float(prune.cubic_sparsity(5, 0.5, 5, 5)) == 0.5


def test_top_masks_global_and_per_kernel_by_hand():
  a, b = jnp.array([[0.1, 0.9], [0.5, 0.3]]), jnp.array([0.2, 0.8, 0.05, 0.7])
  ga, gb = prune.top_masks([a, b], 0.5, "global")   # 4 lowest of 8: .05 .1 .2 .3
  np.testing.assert_array_equal(ga, [[False, True], [True, False]])
  np.testing.assert_array_equal(gb, [False, True, False, True])
  ka, kb = prune.top_masks([a, b], 0.25, "kernel")  # the lowest 1 of each
  np.testing.assert_array_equal(ka, [[False, True], [True, True]])
  np.testing.assert_array_equal(kb, [True, True, False, True])
  assert all(m.all() for m in prune.top_masks([a, b], 0.0, "global"))


def _tiny_params():
  args, params = _model()
  return args, params


def _flat(tree):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def test_magnitude_masks_the_smallest_weights_and_they_stay_zero():
  import optax
  args, params = _tiny_params()
  spec = prune.Sparsity("magnitude", target=0.7, begin=0, end=0, every=1)
  tx = prune.sparsify(optax.adamw(1e-2, weight_decay=0.1), spec)
  state = tx.init(params)
  p0 = _flat(params)
  paths = prune.pruned_paths(p0, spec.rules)
  assert len(paths) == 2 * 6 and all("layer_" in p for p in paths)
  grads = jax.tree.map(lambda x: jnp.ones_like(x), params)   # every weight pushed
  for step in range(3):
    upd, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, upd)
    flat = _flat(params)
    if step == 0:   # numpy reference: the 70% smallest |W0| of all pruned kernels together
      allw = np.concatenate([np.abs(p0[p]).ravel() for p in paths])
      thr = np.sort(allw)[int(0.7 * allw.size)]
      for p in paths:
        np.testing.assert_array_equal(flat[p] == 0, np.abs(p0[p]) < thr)
    assert prune.sparsity_of(params, spec.rules)["total"] == pytest.approx(0.7, abs=1e-3)
    for p in paths:   # exactly zero, through weight decay and the pushed gradient
      assert np.array_equal(flat[p] == 0, np.abs(p0[p]) < thr)
  # Other parameters train normally (nothing masked).
  word = "encoder/embeddings/word/embedding"
  assert (flat[word] != p0[word]).all()


def test_movement_scores_accumulate_minus_grad_times_weight():
  import optax
  args, params = _tiny_params()
  spec = prune.Sparsity("movement", target=0.5, begin=1, end=1, every=1, scope="kernel",
                        rules=((r".*/layer_0/mlp/mlp_in/kernel", "prune"),))
  lr = 0.1
  tx = prune.sparsify(optax.sgd(lr), spec)
  state = tx.init(params)
  c = jax.tree.map(lambda x: jax.random.normal(jax.random.key(3), x.shape), params)  # dL/dW = c
  w0 = _flat(params)["encoder/layer_0/mlp/mlp_in/kernel"]
  cw = _flat(c)["encoder/layer_0/mlp/mlp_in/kernel"]
  for _ in range(2):
    upd, state = tx.update(c, state, params)
    params = optax.apply_updates(params, upd)
  # S = -c W0 - c W1 with W1 = W0 - lr c; the mask drops the lower half of S at step 1.
  score = -cw * w0 - cw * (w0 - lr * cw)
  got = _flat(params)["encoder/layer_0/mlp/mlp_in/kernel"]
  np.testing.assert_array_equal(got == 0, score < np.sort(score.ravel())[score.size // 2])
  assert (got == 0).mean() == pytest.approx(0.5)


def test_movement_is_straight_through_and_masked_weights_return():
  """Sanh et al.'s hard movement pruning simulated in numpy: the scores of masked weights keep
  moving (-g W with the dense W), a masked weight whose score climbs back returns with its old
  value, and the parameters are the masked weights (exact zeros)."""
  import optax
  _, params = _tiny_params()
  path = "encoder/layer_0/mlp/mlp_in/kernel"
  spec = prune.Sparsity("movement", target=0.5, begin=1, end=4, every=1, scope="kernel",
                        rules=((path, "prune"),))
  lr = 0.1
  tx = prune.sparsify(optax.sgd(lr), spec)
  state = tx.init(params)
  rng = np.random.default_rng(0)
  w = _flat(params)[path].astype(np.float64)
  ref_dense, ref_score, ref_mask = w.copy(), np.zeros_like(w), np.ones(w.shape, bool)
  revived = 0
  for t in range(6):
    g = rng.normal(size=w.shape)   # dL/d(W * M) at this step
    grads = jax.tree.map(jnp.zeros_like, params)
    grads = traverse_util.unflatten_dict(dict(_flat(grads), **{path: g.astype(np.float32)}),
                                         sep="/")
    upd, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, upd)
    ref_score -= g * ref_dense
    if 1 <= t <= 4:
      frac = 0.5 - 0.5 * (1 - (t - 1) / 3) ** 3
      k = int(np.floor(np.float32(frac) * w.size))
      new_mask = ref_score >= np.sort(ref_score.ravel())[min(k, w.size - 1)] if k else \
          np.ones(w.shape, bool)
      revived += int((new_mask & ~ref_mask).sum())
      ref_mask = new_mask
    ref_dense = np.where(ref_mask, ref_dense - lr * g, ref_dense)
    got = _flat(params)[path]
    np.testing.assert_array_equal(got == 0, ~ref_mask)
    np.testing.assert_allclose(got, np.where(ref_mask, ref_dense, 0), rtol=1e-5, atol=1e-6)
  assert revived > 0 and (~ref_mask).mean() == pytest.approx(0.5, abs=1e-3)


def test_sparsity_rules_matching_nothing_raise():
  import optax
  _, params = _tiny_params()
  spec = prune.Sparsity(rules=((r"encoder/layer_\d+/atention/.*/kernel", "prune"),))
  with pytest.raises(ValueError, match="match no kernel.*atention"):
    prune.sparsify(optax.sgd(0.1), spec).init(params)
  with pytest.raises(ValueError, match="'prune' | 'keep'"):
    prune.Sparsity(rules=((".*", "drop"),))


def test_sparse_format_round_trips_and_export_keeps_zeros():
  from lib import hf
  args, params = _tiny_params()
  rules = prune.Sparsity().rules
  flat = _flat(params)
  for p in prune.pruned_paths(flat, rules):   # 70% zeros
    flat[p] = np.where(np.abs(flat[p]) < np.quantile(np.abs(flat[p]), 0.7), 0, flat[p])
  params = traverse_util.unflatten_dict(flat, sep="/")
  enc = prune.sparse_encode(params, rules)
  back = prune.sparse_decode(enc)
  assert sorted(back) == sorted(prune.pruned_paths(flat, rules))
  for p, v in back.items():
    np.testing.assert_array_equal(v, flat[p])
  dense = sum(flat[p].nbytes for p in back)
  assert sum(a.nbytes for a in enc.values()) < 0.35 * dense   # 30% values + 1/32 bitmask
  state = hf.params_to_hf(params, args, "seq_cls")
  w = state["bert.encoder.layer.0.intermediate.dense.weight"]
  assert (w == 0).sum() == (flat["encoder/layer_0/mlp/mlp_in/kernel"] == 0).sum()
