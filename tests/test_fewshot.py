"""lib/fewshot.py: K-shot splits, contrastive pairs and loss, the logistic-regression head, the
cloze scorer; checked against hand computations and independent numpy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lib import fewshot


def _labels(n=200, seed=0):
  return np.random.default_rng(seed).choice(["neg", "pos", "neu"], size=n, p=[0.5, 0.3, 0.2])


def test_kshot_is_stratified_disjoint_and_deterministic():
  labels = _labels()
  train, dev = fewshot.kshot_split(labels, k=8, seed=3)
  for split in (train, dev):
    values, counts = np.unique(labels[split], return_counts=True)
    assert list(values) == ["neg", "neu", "pos"] and list(counts) == [8, 8, 8]
  assert not set(train) & set(dev)
  again = fewshot.kshot_split(labels, k=8, seed=3)
  assert np.array_equal(train, again[0]) and np.array_equal(dev, again[1])
  other = fewshot.kshot_split(labels, k=8, seed=4)
  assert not np.array_equal(train, other[0])


def test_kshot_nested_over_k_and_never_touches_dev():
  labels = _labels()
  small, dev_small = fewshot.kshot_split(labels, k=4, seed=1)
  big, dev_big = fewshot.kshot_split(labels, k=16, seed=1, dev_k=4)
  assert set(small) <= set(big)
  assert np.array_equal(dev_small, dev_big)
  assert not set(big) & set(dev_small)


def test_kshot_only_indexes_the_given_split_and_refuses_small_classes():
  labels = _labels(60)
  train, dev = fewshot.kshot_split(labels, k=2, seed=0, dev_k=1)
  assert max(train.max(), dev.max()) < len(labels)
  with pytest.raises(ValueError, match=r"class 'neg' has \d+ training examples"):
    fewshot.kshot_split(labels, k=30, seed=0)


def test_pairs_are_balanced_and_labelled_correctly():
  labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
  a, b, t = fewshot.contrastive_pairs(labels, iterations=5, seed=0)
  assert len(a) == 2 * 5 * len(labels)
  assert (t == 1).sum() == (t == 0).sum()
  np.testing.assert_array_equal(t, (labels[a] == labels[b]).astype(np.float32))
  assert not np.any((a == b) & (t == 1))         # a positive is another example of the class
  assert np.array_equal(np.bincount(a), np.full(len(labels), 10))   # every example anchors


def test_pairs_need_two_classes():
  with pytest.raises(ValueError, match="two classes"):
    fewshot.contrastive_pairs([1, 1, 1], 2, 0)


def test_mean_pool_and_cosine_loss_by_hand():
  h = jnp.array([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
  pooled = fewshot.mean_pool(h, jnp.array([[1, 1, 0]]))
  np.testing.assert_allclose(pooled, [[2.0, 3.0]])
  u, v = jnp.array([[1.0, 0.0], [1.0, 1.0]]), jnp.array([[0.0, 1.0], [2.0, 2.0]])
  loss, cos = fewshot.cosine_similarity_loss(u, v, jnp.array([1.0, 1.0]))
  np.testing.assert_allclose(cos, [0.0, 1.0], atol=1e-6)
  np.testing.assert_allclose(loss, 0.5, atol=1e-6)   # ((0 - 1)^2 + (1 - 1)^2) / 2


def test_logistic_regression_reaches_the_optimum():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(60, 5)).astype(np.float32)
  y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int32) + (x[:, 2] > 1.0)
  w, b = fewshot.fit_logistic_regression(x, y, 3, c=1.0)
  # Optimality, by hand in numpy: grad_W = X^T (P - Y) + W / C = 0, grad_b = sum(P - Y) = 0.
  z = x @ w + b
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  r = p - np.eye(3)[y]
  np.testing.assert_allclose(x.T @ r + w, 0.0, atol=2e-3)
  np.testing.assert_allclose(r.sum(0), 0.0, atol=2e-3)
  assert (fewshot.predict_linear(x, (w, b)) == y).mean() > 0.8


def test_cloze_scores_only_the_verbalizer_tokens():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 10)).astype(np.float32)
  pos, verb = np.array([1, 3]), np.array([7, 2])
  got = fewshot.verbalizer_log_probs(jnp.asarray(logits), jnp.asarray(pos), verb)
  for i in range(2):
    words = logits[i, pos[i], verb]
    ref = words - np.log(np.exp(words).sum())
    np.testing.assert_allclose(got[i], ref, rtol=1e-5)
  changed = logits.copy()
  changed[:, :, [0, 1, 3, 4, 5, 6, 8, 9]] += rng.normal(size=(2, 4, 8)) * 10   # not label words
  changed[0, 0] += 5.0                                                         # not the mask
  again = fewshot.verbalizer_log_probs(jnp.asarray(changed), jnp.asarray(pos), verb)
  np.testing.assert_allclose(again, got, rtol=1e-5)


def test_pattern_ensemble_and_template():
  a, b = jnp.log(jnp.array([[0.9, 0.1]])), jnp.log(jnp.array([[0.3, 0.7]]))
  np.testing.assert_allclose(fewshot.ensemble_patterns([a, b], [3.0, 1.0]),
                             (3 * a + b) / 4, rtol=1e-6)
  assert fewshot.cloze_texts("{sentence} It was {mask}.", ["good film"], "[MASK]") == [
      "good film It was [MASK]."]
  with pytest.raises(ValueError, match="template"):
    fewshot.cloze_texts("{sentence}", ["x"], "[MASK]")


def test_cloze_log_probs_reads_the_mask_position_of_an_mlm_model():
  tok, _, module, params = _tiny_mlm()
  sentences = ["a fine film", "dull"]
  got = fewshot.cloze_log_probs(module, params, tok, sentences, "{sentence} it was {mask} .",
                                ["great", "terrible"], max_len=16)
  verb = [tok.convert_tokens_to_ids(w) for w in ("great", "terrible")]
  for i, s in enumerate(sentences):         # independent: one unpadded text at a time
    enc = tok(f"{s} it was {tok.mask_token} .", return_tensors="np")
    ids = enc["input_ids"].astype(np.int32)
    logits = np.asarray(module.apply({"params": params}, ids, np.ones_like(ids))[0]["logits"])
    words = logits[0, list(ids[0]).index(tok.mask_token_id), verb]
    np.testing.assert_allclose(got[i], words - np.log(np.exp(words).sum()), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="verbalizer word"):
    fewshot.verbalizer_token_ids(tok, ["unbelievablyxq"])


@pytest.mark.slow
def test_kshot_files_and_setfit_task_run_through_the_skeleton(tmp_path):
  import csv
  from configs import fewshot as fewshot_config
  from lib import experiment, models, tasks
  d = tmp_path / "toy"
  d.mkdir()
  rng = np.random.default_rng(0)
  for name, n in (("train", 40), ("dev", 8), ("test", 12)):
    with open(d / f"{name}.tsv", "w") as f:
      f.write("sentence\tlabel\n")
      for i in range(n):
        good = i % 2
        f.write(f"{'great' if good else 'awful'} {' '.join(rng.choice(['film', 'plot'], 3))} "
                f"{name}{i}\t{'pos' if good else 'neg'}\n")
  cfg = fewshot_config.get_config()
  cfg.data.dataset, cfg.data.cache_dir = f"tsv:{d}", str(tmp_path / "cache")
  cfg.data.max_len, cfg.data.eval_batch_size = 16, 8
  paths = fewshot.write_kshot_data(cfg.data, 4, seed=0, out_dir=str(tmp_path / "k4"))
  read = lambda s: list(csv.DictReader(open(paths[s]), delimiter="\t"))
  train, dev, test = read("train"), read("validation"), read("test")
  assert sorted(r["label"] for r in train) == ["neg"] * 4 + ["pos"] * 4 and len(dev) == 8
  assert all("train" in r["sentence"] for r in train + dev)          # never dev or test lines
  assert not {r["sentence"] for r in train} & {r["sentence"] for r in dev} and len(test) == 12
  c = fewshot.kshot_config(cfg, paths, "contrastive", **dict(cfg.fewshot.setfit_overrides))
  c.data.batch_size, c.setfit.iterations = 8, 2
  tiny = models.ModelArgs(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, max_len=32)
  out = experiment.run(c, str(tmp_path / "run"), tasks.get("contrastive"), preset_args=tiny)
  assert out["train"]["steps"] == 2 * 2 * 8 // 8                    # pairs per epoch / batch
  rows = list(csv.DictReader(open(tmp_path / "run" / "test_predictions.tsv"), delimiter="\t"))
  assert len(rows) == 12
  acc = np.mean([r["gold"] == r["predicted"] for r in rows])
  assert out["test"]["accuracy"] == pytest.approx(acc)
  head = np.load(tmp_path / "run" / "head.npz")
  assert head["kernel"].shape == (32, 2) and list(head["label_names"]) == ["neg", "pos"]
  # The finished run is reused by the same config, refused (not silently reused) by another.
  assert fewshot.run_once(c, str(tmp_path / "run"))["test"] == out["test"]["accuracy"]
  c.setfit.iterations = 3
  with pytest.raises(experiment.ResumeMismatchError, match=r"setfit.iterations: 2 -> 3"):
    fewshot.run_once(c, str(tmp_path / "run"))


def test_sentence_like_pool_filter():
  assert fewshot.sentence_like("a gorgeous , witty , seductive movie that rewards patience .")
  assert not fewshot.sentence_like("finely detailed")
  assert not fewshot.sentence_like("to fall prey to a boatload of screenwriting cliches that sink")


@pytest.mark.slow
def test_frozen_method_keeps_the_encoder_and_fits_the_head_on_its_embeddings(tmp_path):
  import csv
  from configs import fewshot as fewshot_config
  from lib import experiment, model_io, models, tasks
  from lib.tasks import common
  d = tmp_path / "toy"
  d.mkdir()
  for name, n in (("train", 16), ("dev", 4), ("test", 10)):
    with open(d / f"{name}.tsv", "w") as f:
      f.write("sentence\tlabel\n" + "".join(
          f"{'great' if i % 2 else 'awful'} film {name}{i}\t{'pos' if i % 2 else 'neg'}\n"
          for i in range(n)))
  cfg = fewshot_config.get_config()
  cfg.data.dataset, cfg.data.cache_dir = f"tsv:{d}", str(tmp_path / "cache")
  cfg.data.max_len, cfg.data.eval_batch_size = 16, 8
  paths = fewshot.write_kshot_data(cfg.data, 4, seed=0, out_dir=str(tmp_path / "k4"))
  c = fewshot.setfit_config(cfg, paths, frozen=True)
  c.data.batch_size, c.setfit.iterations = 8, 2
  tiny = models.ModelArgs(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, max_len=32)
  task = tasks.get("contrastive")
  init = experiment.setup(c, str(tmp_path / "init"), task, preset_args=tiny).state.params
  out = experiment.run(c, str(tmp_path / "run"), task, preset_args=tiny)
  assert out["train"]["steps"] == 1 and out["train"]["trainable_params"] == 0
  final = model_io.load_model(str(tmp_path / "run"), None, 0)
  for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(final.params)):
    # One float32 ulp of slack (the saved copy); a training step at lr 1e-4 moves far more.
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)
  # The head refitted here on the initial encoder's normalised mean-pooled embeddings.
  module = models.build(final.args, None, 0)
  tok = model_io.load_tokenizer("minilm", "bert", cfg.data.dir)[0]
  def embed(split):
    rows = list(csv.DictReader(open(paths[split]), delimiter="\t"))
    enc = tok([r["sentence"] for r in rows], padding=True, return_tensors="np")
    batch = dict(input_ids=enc["input_ids"], input_mask=enc["attention_mask"],
                 token_type_ids=np.zeros_like(enc["input_ids"]))
    e = np.asarray(fewshot.mean_pool(common.apply_model(module, init, batch)[0][
        "last_hidden_state"], batch["input_mask"]))
    return e / np.linalg.norm(e, axis=1, keepdims=True), np.array([r["label"] == "pos"
                                                                   for r in rows], int)
  (x, y), (xt, yt) = embed("train"), embed("test")
  head = fewshot.fit_logistic_regression(x, y, 2, c.setfit.c)
  assert out["test"]["accuracy"] == pytest.approx(np.mean(fewshot.predict_linear(xt, head) == yt))


# ----------------------------------------------------------------------------- cloze (prompt-based)

@functools.lru_cache(maxsize=2)   # one init per seed for the whole file (seconds each)
def _tiny_mlm(seed=0):
  """(minilm tokenizer, args, module, params) of a 1-layer BERT with the 'mlm' head."""
  from lib import model_io, models
  tok, _ = model_io.load_tokenizer("minilm", "bert", "")
  args = models.ModelArgs(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, max_len=32,
                          vocab_size=len(tok))
  module = models.build(args, "mlm")
  params, _ = models.init_params(module, jax.random.key(seed))
  return tok, args, module, params


def _cloze_batch(tok, texts, labels, words, example_ids=None):
  from lib.tasks import cloze

  class Inner:   # one batch, as a seq_cls evaluation iterator yields it
    info = {}
    def __init__(self):
      enc = tok(texts, padding=True, return_tensors="np")
      self.batch = dict(input_ids=enc["input_ids"].astype(np.int32),
                        input_mask=enc["attention_mask"].astype(np.int32),
                        token_type_ids=np.zeros_like(enc["input_ids"], np.int32),
                        label=np.asarray(labels, np.int32))
      if example_ids is not None:
        self.batch["example_ids"] = np.asarray(example_ids, np.int32)
    def __len__(self):
      return 1
    def __iter__(self):
      return self
    def __next__(self):
      return self.batch
  ids = fewshot.verbalizer_token_ids(tok, words)
  return next(cloze.ClozeBatches(Inner(), tok.mask_token_id, ids)), ids


def test_cloze_batches_locate_the_mask_and_refuse_a_lost_one():
  from lib import model_io
  tok, _ = model_io.load_tokenizer("minilm", "bert", "")
  texts = ["good . it was [MASK] .", "[MASK] movie", "padding row"]
  batch, ids = _cloze_batch(tok, texts, [1, 0, 0], ["terrible", "great"], [0, 1, -1])
  for r, text in enumerate(texts[:2]):
    row = tok(text)["input_ids"]
    assert batch["mask_pos"][r] == row.index(tok.mask_token_id)
  np.testing.assert_array_equal(batch["label_token_ids"],
                                [[tok.convert_tokens_to_ids(w) for w in ("terrible", "great")]] * 3)
  with pytest.raises(ValueError, match=r"1 texts of a batch hold \[0\] mask tokens"):
    _cloze_batch(tok, ["no mask here", "[MASK] x"], [0, 1], ["terrible", "great"])


def test_prompt_finetuning_loss_and_gradient_by_hand():
  from lib.tasks import cloze
  tok, _, module, params = _tiny_mlm()
  texts = ["a fine film . it was [MASK] .", "dull [MASK] .", "it was [MASK] and long", "pad"]
  batch, ids = _cloze_batch(tok, texts, [1, 0, 0, 1], ["terrible", "great"], [0, 1, 2, -1])
  loss_fn = cloze.make_loss(module)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=3)(
      params, batch, None, False)
  # Independent: the head on every position (the model's own 'mlm' output), numpy from there.
  logits = np.asarray(module.apply({"params": params}, batch["input_ids"],
                                   batch["input_mask"])[0]["logits"], np.float64)
  nll, probs = [], []
  for r in range(3):                       # row 3 is padding: no loss
    pos = list(batch["input_ids"][r]).index(tok.mask_token_id)
    words = logits[r, pos, ids]
    p = np.exp(words - words.max())
    p /= p.sum()
    probs.append(p)
    nll.append(-np.log(p[batch["label"][r]]))
  np.testing.assert_allclose(loss, np.mean(nll), rtol=1e-5)
  assert metrics["accuracy"] == pytest.approx(np.mean([p.argmax() == y for p, y in
                                                       zip(probs, batch["label"][:3])]))
  # d loss / d (MLM output bias): (p - onehot) / 3 on the two label words, exactly 0 elsewhere.
  g = np.asarray(grads["mlm"]["bias"])
  expect = np.mean([p - np.eye(2)[y] for p, y in zip(probs, batch["label"][:3])], axis=0)
  np.testing.assert_allclose(g[ids], expect, rtol=1e-4, atol=1e-7)
  assert np.count_nonzero(np.delete(g, ids)) == 0


def test_cloze_config_errors_name_the_entry(tmp_path):
  import ml_collections
  from lib import errors
  good = dict(mlm_source="minilm", patterns=("{sentence} It was {mask}.",),
              verbalizer=(("negative", "terrible"), ("positive", "great")))
  check = lambda **kw: fewshot.check_cloze_config(ml_collections.ConfigDict(dict(good, **kw)),
                                                  ["negative", "positive"])
  check()
  with pytest.raises(errors.ConfigError, match=r"config.cloze.patterns\[1\]=.*one '\{mask\}'"):
    check(patterns=("{sentence} It was {mask}.", "{sentence} It was great."))
  with pytest.raises(errors.ConfigError, match=r"patterns\[0\]"):
    check(patterns=("{mask} {sentence} {mask}",))
  with pytest.raises(errors.ConfigError, match="one \\(label, word\\) pair per label"):
    check(verbalizer=(("negative", "terrible"),))
  with pytest.raises(errors.ConfigError, match="config.cloze.mlm_source="):
    check(mlm_source=str(tmp_path / "nothing"))


def test_cloze_files_and_pet_ensemble(tmp_path):
  d = tmp_path / "k"
  d.mkdir()
  paths = {}
  for s in ("train", "validation", "test"):
    (d / f"{s}.tsv").write_text("sentence\tlabel\nfine film .\tpositive\ndull\tnegative\n")
    paths[s] = str(d / f"{s}.tsv")
  out = fewshot.write_cloze_data(paths, "{sentence} It was {mask}.", "[MASK]", str(d / "p0"))
  assert open(out["test"]).read() == ("sentence\tlabel\nfine film . It was [MASK].\tpositive\n"
                                      "dull It was [MASK].\tnegative\n")
  assert fewshot.write_cloze_data(paths, "{sentence} It was {mask}.", "[MASK]",
                                  str(d / "p0")) == out
  from lib import errors
  with pytest.raises(errors.ConfigError, match="made with the pattern '{sentence} It was"):
    fewshot.write_cloze_data(paths, "{sentence} A {mask} one.", "[MASK]", str(d / "p0"))
  # Two runs' saved log-probs, each right on 2 of 3; the mean of the log-probs on 3 of 3.
  gold = np.array([0, 1, 1])
  a = np.log([[0.7, 0.3], [0.3, 0.7], [0.55, 0.45]])
  b = np.log([[0.4, 0.6], [0.45, 0.55], [0.1, 0.9]])
  runs = []
  for name, lp in (("a", a), ("b", b)):
    (tmp_path / name).mkdir()
    np.savez(tmp_path / name / "log_probs.npz", validation=lp, validation_gold=gold, test=lp,
             test_gold=gold)
    runs.append(dict(workdir=str(tmp_path / name), dev=0.0, test=0.0, steps=10, wall_s=1.0))
  res = fewshot.ensemble_runs(runs)
  assert res["test"] == pytest.approx(1.0) and res["dev"] == pytest.approx(1.0)
  assert res["steps"] == 20 and len(res["patterns"]) == 2


@pytest.mark.slow
def test_cloze_runs_carry_the_mlm_head_over_zero_shot_and_fine_tuned(tmp_path):
  from configs import fewshot as fewshot_config
  from lib import model_io
  tok, args, module, params = _tiny_mlm(seed=1)
  great, terrible = (tok.convert_tokens_to_ids(w) for w in ("great", "terrible"))
  params = jax.tree.map(np.asarray, params)
  params["mlm"]["bias"] = params["mlm"]["bias"].copy()
  params["mlm"]["bias"][great] += 3.0      # a head that is not a fresh init's (bias 0)
  src = model_io.save_model_dir(str(tmp_path / "mlm"), args, params, head="mlm")
  d = tmp_path / "toy"
  d.mkdir()
  for name, n in (("train", 16), ("dev", 4), ("test", 6)):
    (d / f"{name}.tsv").write_text("sentence\tlabel\n" + "".join(
        f"{'great' if i % 2 else 'awful'} film {name}{i}\t{'positive' if i % 2 else 'negative'}\n"
        for i in range(n)))
  cfg = fewshot_config.get_config()
  cfg.data.dataset, cfg.data.cache_dir = f"tsv:{d}", str(tmp_path / "cache")
  cfg.data.eval_batch_size, cfg.cloze.mlm_source = 8, src
  cfg.cloze.overrides = (("data.max_len", 32), ("train.eval_every", 2))
  cfg.cloze.grid = ((1e-3, 8),)
  paths = fewshot.write_kshot_data(cfg.data, 4, seed=0, out_dir=str(tmp_path / "k4"))
  cfg.train.num_steps = 4
  zero = fewshot.run_method(cfg, "cloze_zeroshot", paths, str(tmp_path / "runs"), "k4_seed0")
  saved = np.load(tmp_path / "runs" / "cloze_zeroshot" / "p0" / "log_probs.npz")
  # Independent: the saved model's full MLM logits on each pattern-applied test text.
  texts = [l.split("\t")[0] for l in open(tmp_path / "k4" / "cloze_p0" / "test.tsv")][1:]
  for i, text in enumerate(texts):
    ids = np.asarray(tok(text)["input_ids"], np.int32)[None]
    logits = np.asarray(module.apply({"params": params}, ids, np.ones_like(ids))[0]["logits"])
    words = logits[0, list(ids[0]).index(tok.mask_token_id), [terrible, great]]
    np.testing.assert_allclose(saved["test"][i], words - np.log(np.exp(words).sum()), rtol=1e-4,
                               atol=1e-5)
  assert zero["test"] == pytest.approx(np.mean(saved["test"].argmax(1) == saved["test_gold"]))
  tuned = fewshot.run_method(cfg, "cloze_finetune", paths, str(tmp_path / "runs"), "k4_seed0")
  assert tuned["steps"] == 4 and tuned["lr"] == 1e-3
  final = model_io.load_model(tuned["workdir"], "mlm", 0).params
  assert not np.allclose(final["mlm"]["bias"], params["mlm"]["bias"])   # the head was trained
  assert final["mlm"]["bias"][great] > 1.0                             # ... from the saved one
  pet = fewshot.run_method(cfg, "cloze_zeroshot_pet", paths, str(tmp_path / "runs"), "k4_seed0")
  assert len(pet["patterns"]) == 3 and pet["patterns"][0]["test"] == zero["test"]
