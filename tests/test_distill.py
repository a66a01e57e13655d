"""Distillation (lib/distill.py): losses against hand computations, the student made from teacher
layers, the frozen teacher (no gradient, no optimizer state), the logit cache's key, and a quick
run end to end that exports to Hugging Face."""

import json
import math
import os
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import distill_sst2
from lib import distill, errors, model_io, models
import training_helpers  # pylint: disable=wrong-import-order
from lib.tasks import classification

TEACHER = models.ModelArgs(vocab_size=64, hidden_size=32, num_layers=4, num_heads=2, mlp_dim=64,
                           max_len=32, dropout_rate=0.0, attention_dropout_rate=0.0)


def _cfg(**weights):
  c = ml_collections.ConfigDict(dict(distill=distill.default_config()))
  c.distill.weights.update(dict(dict(hard=1.0, soft=1.0, hidden=1.0, attention=1.0, value=1.0),
                                **weights))
  return c


def _teacher(seed=0, args=TEACHER):
  module = models.build(args, "seq_cls", 2)
  params = models.init_params(module, jax.random.key(seed))[0]
  # Logits of a random init are ~0 for every input; larger ones make the soft loss informative.
  params["classifier"]["kernel"] = params["classifier"]["kernel"] * 300.0
  for i in range(args.num_layers):   # and peaked attention (near uniform at init)
    att = params["encoder"][f"layer_{i}"]["attention"]
    for name in ("query", "key", "value"):
      att[name]["kernel"] = att[name]["kernel"] * (5.0 + i)
  return module, params


def _batch(b=4, t=8, seed=0):
  rng = np.random.default_rng(seed)
  mask = np.ones((b, t), np.int32)
  mask[1, 5:] = 0
  mask[3, 3:] = 0
  ids = np.where(mask > 0, rng.integers(1, 64, (b, t)), 0).astype(np.int32)
  return dict(input_ids=ids, input_mask=mask, token_type_ids=np.zeros_like(ids),
              label=rng.integers(0, 2, b).astype(np.int32))


def _losses(layers, cfg=None, seed=0):
  """The distillation terms of a student made from `layers` of a random teacher."""
  t_module, t_params = _teacher(seed)
  s_args, s_params = distill.student_from_layers(TEACHER, t_params, layers)
  s_module = models.build(s_args, "seq_cls", 2)
  loss = distill.make_loss(classification, s_module, cfg or _cfg(), t_module, layers)
  return jax.jit(loss, static_argnums=3)(s_params, _batch(), None, False, t_params)


# ----------------------------------------------------------------------------- the losses

def test_student_equal_to_the_teacher_has_zero_distillation_losses():
  _, m = _losses((0, 1, 2, 3))
  for k in ("soft", "hidden", "attention", "value"):
    assert abs(float(m[f"distill_{k}"])) < 1e-6, (k, m[f"distill_{k}"])
  _, other = _losses((1, 3))          # a real (half-depth) student: every term is positive
  for k in ("soft", "hidden", "attention", "value"):
    assert float(other[f"distill_{k}"]) > 1e-5, (k, other[f"distill_{k}"])


def test_soft_kl_is_t_squared_times_kl_at_temperature_t_by_hand():
  s, t = np.array([[1.0, 0.0, -1.0]]), np.array([[0.0, 2.0, 0.5]])
  for temp in (1.0, 2.0, 4.0):
    p = np.exp(t[0] / temp) / np.exp(t[0] / temp).sum()
    q = np.exp(s[0] / temp) / np.exp(s[0] / temp).sum()
    hand = temp ** 2 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    got = distill.soft_kl(jnp.asarray(s), jnp.asarray(t), temp, jnp.ones(1))
    assert float(got) == pytest.approx(hand, rel=1e-5)
  # Token logits (B, T, C): the mean over real tokens only.
  s3, t3 = np.zeros((1, 2, 3)), np.stack([t, t * 100.0], 1)
  masked = distill.soft_kl(jnp.asarray(s3), jnp.asarray(t3), 2.0, jnp.array([[1, 0]]))
  q = np.full(3, 1 / 3)
  p = np.exp(t[0] / 2) / np.exp(t[0] / 2).sum()
  assert float(masked) == pytest.approx(4.0 * float((p * np.log(p / q)).sum()), rel=1e-5)


def test_hidden_and_relation_losses_by_hand():
  s = jnp.array([[[1.0, 0.0], [5.0, 5.0]]])                 # (1, 2, 2); token 2 is padding
  t = jnp.array([[[1.0, 1.0], [0.0, 1.0]]])
  mask = jnp.array([[1, 0]])
  assert float(distill.hidden_loss(s, t, mask)) == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-6)
  assert float(distill.hidden_loss(s, t, mask, "mse")) == pytest.approx(0.5, rel=1e-6)
  v = jnp.array([[[[1.0]], [[2.0]], [[9.0]]]])               # (1, T=3, H=1, Dh=1), key 3 padded
  rel = distill.value_relation(v, jnp.array([[1, 1, 0]]))
  row0 = np.exp([1.0, 2.0]) / np.exp([1.0, 2.0]).sum()       # softmax of v0 * (v0, v1)
  np.testing.assert_allclose(rel[0, 0, 0], [*row0, 0.0], rtol=1e-6)


def test_teacher_gets_no_gradient():
  t_module, t_params = _teacher()
  s_args, s_params = distill.student_from_layers(TEACHER, t_params, (1, 3))
  s_module = models.build(s_args, "seq_cls", 2)
  loss = distill.make_loss(classification, s_module, _cfg(), t_module, (1, 3))
  g_teacher = jax.jit(jax.grad(lambda tp: loss(s_params, _batch(), None, False, tp)[0]))(t_params)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_teacher))
  g_student = jax.jit(jax.grad(lambda sp: loss(sp, _batch(), None, False, t_params)[0]))(s_params)
  assert float(jnp.abs(g_student["encoder"]["layer_0"]["attention"]["query"]["kernel"]).max()) > 0


# ----------------------------------------------------------------------------- the student

def test_student_layers_are_the_chosen_teacher_layers():
  _, t_params = _teacher()
  args, s = distill.student_from_layers(TEACHER, t_params, (0, 3))
  assert args.num_layers == 2 and sorted(s["encoder"]) == ["embeddings", "layer_0", "layer_1"]
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a),
                                                                jax.tree.leaves(b)))
  assert same(s["encoder"]["layer_0"], t_params["encoder"]["layer_0"])
  assert same(s["encoder"]["layer_1"], t_params["encoder"]["layer_3"])
  assert not same(s["encoder"]["layer_1"], t_params["encoder"]["layer_1"])
  assert same(s["classifier"], t_params["classifier"]) and same(s["pooler"], t_params["pooler"])
  assert distill.every_other(6) == (1, 3, 5) and distill.every_other(4) == (1, 3)
  assert distill.hidden_map((1, 3)) == (0, 2, 4)
  # The map through the model: the student's first layer is the teacher's first here.
  t_module, _ = _teacher()
  _, s1 = distill.student_from_layers(TEACHER, t_params, (0,))
  s_module = models.build(distill.student_from_layers(TEACHER, t_params, (0,))[0], "seq_cls", 2)
  hs = distill.forward(s_module, s1, _batch())[1]["hidden_states"]
  ht = distill.forward(t_module, t_params, _batch())[1]["hidden_states"]
  np.testing.assert_allclose(hs[1], ht[1], atol=1e-6)
  for bad in ((4,), (1, 1), (-1,)):
    with pytest.raises(errors.ConfigError, match="distinct teacher layer indices"):
      distill.check_layers(bad, 4)


# ----------------------------------------------------------------------------- the logit cache

class _Batches:
  def __init__(self, batches):
    self.batches, self.i = batches, 0

  def __len__(self):
    return len(self.batches)

  def __next__(self):
    self.i += 1
    return self.batches[(self.i - 1) % len(self.batches)]


def _teacher_record(params, source="t"):
  return distill.Teacher(None, params, TEACHER, "seq_cls", ["neg", "pos"], source, "minilm")


def test_logit_cache_is_rebuilt_when_the_teacher_or_the_data_change(tmp_path):
  module, params = _teacher()
  batches = [_batch(seed=i) for i in range(3)]
  for b in batches:
    b["example_ids"] = np.arange(4)
  calls = []
  def predict_with(p):
    def predict(b):
      calls.append(1)
      return distill.forward(module, p, b)[0]["logits"]
    return predict
  key = distill.cache_key(_teacher_record(params), {"dataset": "x"})
  cache = distill.LogitCache.load_or_build(str(tmp_path), key, predict_with(params),
                                           _Batches(batches))
  assert len(calls) == 3
  np.testing.assert_allclose(cache.lookup(batches[1]),
                             distill.forward(module, params, batches[1])[0]["logits"], atol=1e-6)
  # Same teacher and data: read back, nothing recomputed.
  again = distill.LogitCache.load_or_build(str(tmp_path), key, predict_with(params),
                                           _Batches(batches))
  assert len(calls) == 3 and np.array_equal(again.lookup(batches[2]), cache.lookup(batches[2]))
  # One teacher parameter changed (same source path): a new key, the logits recomputed.
  changed = jax.tree.map(lambda x: x, params)
  changed["classifier"]["kernel"] = changed["classifier"]["kernel"] + 1.0
  key2 = distill.cache_key(_teacher_record(changed), {"dataset": "x"})
  assert key2 != key
  new = distill.LogitCache.load_or_build(str(tmp_path), key2, predict_with(changed),
                                         _Batches(batches))
  assert len(calls) == 6
  assert not np.allclose(new.lookup(batches[0]), cache.lookup(batches[0]))
  assert distill.cache_key(_teacher_record(params), {"dataset": "y"}) != key
  with pytest.raises(RuntimeError, match="not in the teacher-logit cache"):
    cache.lookup(_batch(seed=99) | {"example_ids": np.arange(4)})


# ----------------------------------------------------------------------------- a run end to end

def _quick_config(tmp_path, variant):
  d = training_helpers.write_toy_sentiment(tmp_path / "toydata")
  args = models.ModelArgs(hidden_size=32, num_layers=4, num_heads=2, mlp_dim=64, max_len=32,
                          dropout_rate=0.1, attention_dropout_rate=0.1)
  module = models.build(args, "seq_cls", 2)
  params = models.init_params(module, jax.random.key(0))[0]
  teacher = model_io.save_model_dir(str(tmp_path / "teacher"), args, params, "seq_cls", 2,
                                    ["neg", "pos"], tokenizer="minilm")
  cfg = distill_sst2.get_config(variant)
  cfg.data.dataset, cfg.data.cache_dir = f"tsv:{d}", str(tmp_path / "cache")
  cfg.data.max_train_examples, cfg.data.batch_size, cfg.data.eval_batch_size = 0, 16, 16
  cfg.data.max_len, cfg.train.epochs, cfg.optim.lr = 16, 2, 3e-3
  cfg.distill.teacher, cfg.distill.speed_batch_size = teacher, 8
  return cfg, params


@pytest.mark.slow
def test_quick_run_end_to_end_writes_the_distill_block_and_exports_to_hf(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from lib import hf, tasks  # pylint: disable=g-import-not-at-top
  cfg, t_params = _quick_config(tmp_path, "quick+minilm")
  workdir = str(tmp_path / "run")
  out = distill.run(cfg, workdir, tasks.get("classification"))
  saved = json.load(open(os.path.join(workdir, "metrics.json")))
  b = saved["distill"]
  assert b["teacher"]["layers"] == 4 and b["student"]["layers"] == 2
  student = model_io.load_model(workdir, "seq_cls", 2)
  assert b["student"]["params"] == models.param_count(student.params)
  assert b["teacher"]["params"] == models.param_count(t_params)
  assert b["student"]["test"] == out["test"]["accuracy"] == saved["test"]["accuracy"]
  assert b["student_over_teacher"] == pytest.approx(b["student"]["test"] / b["teacher"]["test"])
  assert b["speedup"] == pytest.approx(b["student"]["examples_per_s"]
                                       / b["teacher"]["examples_per_s"])
  # The optimizer state is Adam's two moments of the student's parameters, none of the teacher's.
  n_student = b["student"]["params"]
  assert 8 * n_student <= saved["train"]["optimizer_state_bytes"] < 8 * n_student + 1024
  assert all(k in saved["train"] for k in ("steps", "wall_s"))
  init = json.load(open(os.path.join(workdir, "student_init", "model.json")))
  assert init["distilled_from"]["layers"] == [1, 3]
  # The student trains with the teacher's dropout (the teacher itself runs without).
  assert init["args"]["dropout_rate"] == 0.1 and init["args"]["num_layers"] == 2
  # The student exports to a directory transformers loads, with our logits.
  dst = str(tmp_path / "hf")
  model = model_io.ours_to_hf(workdir, dst, cfg.data.dir)
  pt, info = transformers.BertForSequenceClassification.from_pretrained(
      dst, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert pt.config.num_hidden_layers == 2
  enc = hf.load_bert_tokenizer(dst)(["great film plot", "awful scene"], padding=True,
                                    return_tensors="np")
  batch = {k: enc[v].astype(np.int32) for k, v in (("input_ids", "input_ids"),
           ("input_mask", "attention_mask"), ("token_type_ids", "token_type_ids"))}
  ours = distill.forward(models.build(model.args, "seq_cls", 2), model.params, batch)[0]
  with torch.no_grad():
    theirs = pt.eval()(**{k: torch.tensor(v) for k, v in enc.items()}).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours["logits"]), theirs, atol=1e-4)


@pytest.mark.slow
def test_cached_logits_run_and_a_rerun_reads_the_cache(tmp_path):
  from lib import tasks  # pylint: disable=g-import-not-at-top
  cfg, _ = _quick_config(tmp_path, "quick+soft+cache")
  cfg.train.epochs = 1
  distill.run(cfg, str(tmp_path / "run"), tasks.get("classification"))
  files = os.listdir(tmp_path / "cache" / "teacher_logits")
  assert len(files) == 1 and files[0].endswith(".npz")
  with np.load(tmp_path / "cache" / "teacher_logits" / files[0]) as z:
    assert len(z["keys"]) == 64 and z["logits"].shape == (64, 2)
  stamp = os.path.getmtime(tmp_path / "cache" / "teacher_logits" / files[0])
  distill.run(cfg, str(tmp_path / "run2"), tasks.get("classification"))
  assert os.path.getmtime(tmp_path / "cache" / "teacher_logits" / files[0]) == stamp
  bad = distill_sst2.get_config("minilm+cache")
  with pytest.raises(errors.ConfigError, match="cache_logits=True caches logits only"):
    distill.check_compatible(bad.distill, TEACHER, _teacher_record({}), "seq_cls", ["neg", "pos"])


def test_token_logit_cache_returns_each_rows_logits_at_its_real_tokens(tmp_path):
  """Token logits (B, T, C) are cached per row at its real tokens, whatever the row's padding."""
  def predict(b):   # a function of each token's id and position: independent of the batch
    return np.stack([b["input_ids"] * 1.0, np.arange(b["input_ids"].shape[1])[None] + 0.0 * b[
        "input_ids"]], -1).astype(np.float32)
  batches = [dict(_batch(seed=i), example_ids=np.array([0, 1, 2, -1])) for i in range(2)]
  cache = distill.LogitCache.load_or_build(str(tmp_path), "k", predict, _Batches(batches))
  assert cache.token_level
  # The same rows re-padded to a longer bucket, in another order, with a dummy row.
  b = batches[1]
  wide = {k: np.pad(b[k][[2, 0, 3]], ((0, 0), (0, 4))) for k in ("input_ids", "input_mask",
                                                                  "token_type_ids")}
  wide["example_ids"] = np.array([2, 0, -1])
  got = cache.lookup(wide)
  assert got.shape == (3, 12, 2)
  want = predict(b)
  for row, src in ((0, 2), (1, 0)):
    real = b["input_mask"][src].astype(bool)
    np.testing.assert_array_equal(got[row][:real.sum()], want[src][real])
    assert not got[row][real.sum():].any()
  assert not got[2].any()                          # the dummy row


# ----------------------------------------------------------------------------- general distillation

def _general_config(tmp_path, teacher_head=None, variant="quick"):
  from configs import distill_general  # pylint: disable=g-import-not-at-top
  args = models.ModelArgs(hidden_size=32, num_layers=4, num_heads=2, mlp_dim=64, max_len=32)
  params = models.init_params(models.build(args, teacher_head, 2 if teacher_head else 0),
                              jax.random.key(0))[0]
  teacher = model_io.save_model_dir(str(tmp_path / "teacher"), args, params, teacher_head,
                                    2 if teacher_head else 0,
                                    ["neg", "pos"] if teacher_head else [], tokenizer="minilm")
  cfg = distill_general.get_config(variant)
  cache = os.environ.get("WORKBENCH_TEST_DATA_CACHE",   # shared with tests/test_pretrain.py
                         os.path.join(tempfile.gettempdir(), "workbench_data_test"))
  cfg.data.update(dataset="text:shakespeare", cache_dir=cache, max_len=32, batch_size=8,
                  eval_batch_size=8, eval_batches=2)     # 8 simulated devices
  cfg.train.update(num_steps=4, log_every=2, eval_every=2, checkpoint_every=2, peak_flops=0.0)
  cfg.distill.teacher = teacher
  return cfg


@pytest.mark.slow
def test_general_distillation_on_plain_text_then_finetuning_starts_from_it(tmp_path):
  from lib import tasks  # pylint: disable=g-import-not-at-top
  cfg = _general_config(tmp_path)
  workdir = str(tmp_path / "general")
  out = distill.run(cfg, workdir, tasks.get("distill_general"))
  held = out["held_out"]
  assert held["step"] == 4 and held["distill_hard"] == 0.0
  for term in ("attention", "value", "hidden"):            # every weighted term, per corpus
    assert 0 < held[f"distill_{term}"] == held[f"shakespeare/distill_{term}"], held
  assert held["loss"] == pytest.approx(sum(held[f"distill_{t}"] for t in ("attention", "value",
                                                                          "hidden")), rel=1e-5)
  meta = model_io.read_model_json(workdir)
  assert meta["head"] is None and meta["args"].num_layers == 2
  init = model_io.read_model_json(os.path.join(workdir, "student_init"))
  assert init["distilled_from"]["layers"] == [1, 3]
  # A fine-tuning run starts from the distilled encoder with a new head.
  student = model_io.load_model(workdir, "seq_cls", 2)
  assert student.args.num_layers == 2 and "classifier" in student.params


def test_general_distillation_refuses_label_terms(tmp_path):
  from lib import tasks  # pylint: disable=g-import-not-at-top
  cfg = _general_config(tmp_path)
  cfg.distill.weights.hard = 1.0
  with pytest.raises(errors.ConfigError, match="general distillation .* set hard=0 and soft=0"):
    distill.run(cfg, str(tmp_path / "general"), tasks.get("distill_general"))
  assert not os.path.exists(tmp_path / "general" / "metrics.json")


# ----------------------------------------------------------------------------- another width

NARROW = ml_collections.ConfigDict(dict(preset="", hidden_size=16, num_layers=2, num_heads=2,
                                        mlp_dim=32))


def _np_hidden_cosine(s, t, mask):
  """1 - cos per real token, averaged (numpy, float64): the reference of the hidden term."""
  s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
  cos = (s * t).sum(-1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
  return float(((1 - cos) * mask).sum() / mask.sum())


def test_narrow_student_hidden_loss_goes_through_the_learned_projection():
  t_module, t_params = _teacher()
  s_args = distill.random_student_args(NARROW, TEACHER)
  assert (s_args.hidden_size, s_args.num_layers, s_args.vocab_size) == (16, 2, TEACHER.vocab_size)
  layers = distill.student_layer_map((), s_args, TEACHER.num_layers)
  assert layers == (1, 3)
  s_module = models.build(s_args, "seq_cls", 2)
  s_params = models.init_params(s_module, jax.random.key(1))[0]
  cfg = _cfg(soft=0.0)     # attention and value relations too: same heads, other head size
  proj = distill.init_projection(cfg.distill, s_args, TEACHER, layers)
  assert sorted(proj) == ["hidden_0", "hidden_1", "hidden_2"]
  assert proj["hidden_1"]["kernel"].shape == (16, 32)
  params = dict(s_params, **{distill.PROJECTION: proj})
  loss = distill.make_loss(classification, s_module, cfg, t_module, layers)
  b = _batch()

  @jax.jit
  def everything(p):
    (_, m), grads = jax.value_and_grad(lambda p: loss(p, b, None, False, t_params),
                                       has_aux=True)(p)
    hs = distill.forward(s_module, s_params, b)[1]["hidden_states"]
    ht = distill.forward(t_module, t_params, b)[1]["hidden_states"]
    return m, grads, hs, ht
  m, grads, hs, ht = everything(params)
  # Reference: hidden states of each model, projected by hand, compared per mapped pair.
  want = np.mean([_np_hidden_cosine(np.asarray(hs[i]) @ proj[f"hidden_{i}"]["kernel"], ht[j],
                                    b["input_mask"]) for i, j in ((0, 0), (1, 2), (2, 4))])
  assert float(m["distill_hidden"]) == pytest.approx(want, rel=1e-4)
  assert 0 < float(m["distill_attention"]) < 10 and 0 < float(m["distill_value"]) < 10
  # The projection gets gradients (every compared layer's kernel).
  for i in range(3):
    assert float(jnp.abs(grads[distill.PROJECTION][f"hidden_{i}"]["kernel"]).max()) > 0


def test_identity_projection_at_equal_width_equals_the_unprojected_loss():
  t_module, t_params = _teacher()
  s_args, s_params = distill.student_from_layers(TEACHER, t_params, (1, 3))
  s_module = models.build(s_args, "seq_cls", 2)
  cfg = _cfg(attention=0.0, value=0.0)
  assert distill.init_projection(cfg.distill, s_args, TEACHER, (1, 3)) is None   # auto: none
  cfg.distill.projection = "linear"
  proj = distill.init_projection(cfg.distill, s_args, TEACHER, (1, 3))
  assert all(np.array_equal(p["kernel"], np.eye(32)) for p in proj.values())
  loss = jax.jit(distill.make_loss(classification, s_module, cfg, t_module, (1, 3)),
                 static_argnums=3)
  plain = loss(s_params, _batch(), None, False, t_params)[1]
  projected = loss(dict(s_params, **{distill.PROJECTION: proj}), _batch(), None, False,
                   t_params)[1]
  assert float(plain["distill_hidden"]) > 1e-4
  for k in ("loss", "distill_hidden", "distill_soft", "distill_hard"):
    assert float(projected[k]) == pytest.approx(float(plain[k]), rel=1e-5, abs=1e-7), k


def test_student_of_another_size_is_refused_with_one_clear_error():
  teacher = _teacher_record({})
  narrow = distill.random_student_args(NARROW, TEACHER)
  one_head = distill.random_student_args(ml_collections.ConfigDict(dict(num_heads=1)), TEACHER)
  assert one_head.hidden_size == 32 and one_head.num_layers == 4
  cfg = _cfg(attention=1.0, value=0.0)
  with pytest.raises(errors.ConfigError, match="student heads 1 != teacher heads 2 .*widths may"):
    distill.check_compatible(cfg.distill, one_head, teacher, "seq_cls", ["neg", "pos"])
  distill.check_compatible(cfg.distill, narrow, teacher, "seq_cls", ["neg", "pos"])  # 2 heads
  cfg.distill.projection = "none"
  with pytest.raises(errors.ConfigError, match="width 16 != teacher width 32 .*projection"):
    distill.check_compatible(cfg.distill, narrow, teacher, "seq_cls", ["neg", "pos"])
  with pytest.raises(errors.ConfigError, match="hidden_size 30 is not a multiple of num_heads 4"):
    distill.random_student_args(ml_collections.ConfigDict(dict(hidden_size=30, num_heads=4)),
                                TEACHER)
  with pytest.raises(errors.ConfigError, match="one teacher layer per student layer"):
    distill.student_layer_map((0, 1, 2), narrow, 4)
  assert distill.random_student_args(ml_collections.ConfigDict(dict(preset="")), TEACHER) is None
  assert distill.uniform_layers(3, 6) == (1, 3, 5) and distill.uniform_layers(4, 6) == (0, 2, 3, 5)
  c = distill_sst2.get_config("narrow")
  assert distill_sst2.student_preset(c) is None
  c.distill.student.preset = "bert-mini"
  assert distill_sst2.student_preset(c).hidden_size == 256
  c.distill.student.preset = "bert-nano"
  with pytest.raises(errors.ConfigError, match="distill.student.preset='bert-nano': unknown"):
    distill_sst2.student_preset(c)


@pytest.mark.slow
def test_narrow_variant_end_to_end_trains_the_projection_and_exports_the_student_alone(tmp_path):
  from lib import checkpoint, tasks  # pylint: disable=g-import-not-at-top
  cfg, _ = _quick_config(tmp_path, "quick+narrow")
  assert cfg.distill.student.hidden_size == 256 and cfg.distill.hidden_loss == "mse"
  cfg.distill.student.update(dict(hidden_size=16, num_heads=2, mlp_dim=32))   # tiny
  workdir = str(tmp_path / "run")
  out = distill.run(cfg, workdir, tasks.get("classification"))
  s_args = model_io.read_model_json(workdir)["args"]
  assert (s_args.hidden_size, s_args.num_layers) == (16, 3)
  b = out["distill"]
  n_student = models.param_count(models.abstract_params(models.build(s_args, "seq_cls", 2))[0])
  assert b["student"]["params"] == n_student and b["student"]["layers"] == 3
  # The projections (4 hidden states x 16 x 32) trained: their Adam moments are in the state
  # and the final checkpoint's differ from the init.
  n_proj = 4 * 16 * 32
  assert 8 * (n_student + n_proj) <= out["train"]["optimizer_state_bytes"] < (
      8 * (n_student + n_proj) + 1024)
  teacher = distill.load_teacher(cfg.distill.teacher, cfg.data.dir)
  basis = distill.student_basis(cfg.distill.student, s_args, teacher)     # embeddings 'pca'
  init = distill.init_projection(cfg.distill, s_args, teacher.args, (0, 1, 3), cfg.seed, basis)
  assert all(np.array_equal(p["kernel"], basis.T) for p in init.values())
  step = out["train"]["steps"]
  saved = checkpoint.restore_params(
      os.path.join(workdir, "checkpoints", str(step)),
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), init),
      subtree=f"params/{distill.PROJECTION}")
  for k in init:
    assert not np.allclose(np.asarray(saved[k]["kernel"]), init[k]["kernel"]), k
  # The exported student (our model dir, HF) holds the student's parameters alone.
  ours = model_io.to_ours(workdir, str(tmp_path / "ours"))
  assert distill.PROJECTION not in ours.params
  assert models.param_count(ours.params) == n_student
  model_io.ours_to_hf(workdir, str(tmp_path / "hf"), cfg.data.dir)
  hf_cfg = json.load(open(tmp_path / "hf" / "config.json"))
  assert hf_cfg["hidden_size"] == 16 and hf_cfg["num_hidden_layers"] == 3
  # A rerun resumes the finished state (projections included) and trains no further.
  again = distill.run(cfg, workdir, tasks.get("classification"))
  assert again["train"]["steps"] == step and again["test"] == out["test"]


def test_pca_embeddings_are_the_teachers_on_its_top_principal_directions(tmp_path):
  t_module, t_params = _teacher()
  teacher = distill.Teacher(t_module, t_params, TEACHER, "seq_cls", ["neg", "pos"], "t", "minilm")
  basis = distill.pca_basis(teacher, 16)
  np.testing.assert_allclose(basis.T @ basis, np.eye(16), atol=1e-5)
  # Reference: the top eigenvectors of the word embeddings' covariance span the same subspace.
  words = np.asarray(t_params["encoder"]["embeddings"]["word"]["embedding"], np.float64)
  _, vecs = np.linalg.eigh(np.cov(words.T))
  top = vecs[:, ::-1][:, :16]
  np.testing.assert_allclose(np.abs(np.linalg.svd(top.T @ basis)[1]), np.ones(16), atol=1e-4)
  cfg = ml_collections.ConfigDict(dict(NARROW, embeddings="pca"))
  s_args = distill.random_student_args(cfg, TEACHER)
  assert distill.student_basis(cfg, s_args, teacher).shape == (32, 16)
  out = distill.write_student_init(str(tmp_path / "init"), teacher, (), s_args, 0, basis)
  s = model_io.load_model(out, "seq_cls", 2).params["encoder"]["embeddings"]
  for name in ("word", "position", "token_type"):
    np.testing.assert_allclose(
        s[name]["embedding"], np.asarray(t_params["encoder"]["embeddings"][name]["embedding"])
        @ basis, atol=1e-5)
  proj = distill.init_projection(_cfg().distill, s_args, TEACHER, (1, 3), 0, basis)
  assert all(np.array_equal(p["kernel"], basis.T) for p in proj.values())
  with pytest.raises(errors.ConfigError, match="embeddings='nope': valid"):
    distill.student_basis(ml_collections.ConfigDict(dict(embeddings="nope")), s_args, teacher)


@pytest.mark.slow
def test_general_distillation_into_a_narrow_student_with_the_teachers_heads(tmp_path):
  from lib import tasks  # pylint: disable=g-import-not-at-top
  cfg = _general_config(tmp_path, variant="quick+narrow")
  assert cfg.distill.student.num_heads == 12 and cfg.distill.student.embeddings == "pca"
  cfg.distill.student.update(dict(hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32))
  workdir = str(tmp_path / "general")
  held = distill.run(cfg, workdir, tasks.get("distill_general"))["held_out"]
  for term in ("attention", "value", "hidden"):     # across widths: 16 vs 32, head size 8 vs 16
    assert 0 < held[f"distill_{term}"] < 10, held
  student = model_io.load_model(workdir, "seq_cls", 2)   # what fine-tuning starts from
  assert student.args.hidden_size == 16 and distill.PROJECTION not in student.params
