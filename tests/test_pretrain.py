"""Pretraining (lib/pretrain.py, lib/tasks/mlm.py + clm.py, lib/sampling.py, lib/pretrain_data.py).

In-process tests run on the 8 simulated CPU devices of conftest.py; the CLM run and the
fine-tuning from a pretraining workdir go through the research scripts in subprocesses (one device).
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import clm as clm_config
from configs import common
from configs import sst2 as sst2_config
from configs import mlm as mlm_config
from lib import (checkpoint, data, finetune, hf, model_io, models, optim, peft, pretrain,
                 pretrain_data, sampling, train)
from lib.models import ModelArgs
from lib.tasks import clm, mlm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("WORKBENCH_TEST_DATA_CACHE",
                       os.path.join(tempfile.gettempdir(), "workbench_data_test"))
# Stated tolerance: bf16 compute changes the loss by < 0.1% relative (observed <= 5e-5 on CPU, where
# the Dense layers accumulate bf16 products in float32 and attention runs in float32).
BF16_RTOL = 1e-3


def _tiny(arch, vocab, dropout=0.0, **kw) -> ModelArgs:
  base = dict(vocab_size=vocab, hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, max_len=128,
              dropout_rate=dropout, attention_dropout_rate=dropout)
  if arch == "gpt2":
    base.update(arch="gpt2", type_vocab_size=0, activation="gelu_new", layer_norm_eps=1e-5)
  return ModelArgs(**dict(base, **kw))


def _init(args, head, seed=0):
  module = models.build(args, head)
  return module, jax.jit(lambda r: models.init_params(module, r)[0])(jax.random.key(seed))


@pytest.fixture(scope="module")
def bert_tok():
  return hf.load_bert_tokenizer("minilm")


@pytest.fixture(scope="module")
def gpt_tok():
  return hf.load_gpt2_tokenizer(os.path.join(data.DEFAULT_DATA_DIR, "gpt2-bpe"))


def _log_softmax(x):
  """float64 numpy reference."""
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _first_batch(tok, objective, batch_size=8, max_len=64):
  it = data.make_batches("text:shakespeare", "validation", tok, batch_size=batch_size,
                         max_len=max_len, objective=objective, cache_dir=CACHE)
  return next(it)


# ----------------------------------------------------------------------------- overfitting

def _overfit(module, params, loss_fn, batch, steps=20, lr=1e-2):
  cfg = ml_collections.ConfigDict(dict(optim.default_config(), lr=lr, schedule="constant"))
  tx, _ = optim.make_optimizer(cfg, peft.label_params(params, [(".*", "train")], log=False), steps)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params))
  step = jax.jit(train.make_train_step(loss_fn, tx))
  losses = []
  for _ in range(steps):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  return losses


def test_mlm_overfits_a_fixed_batch(bert_tok):
  batch = _first_batch(bert_tok, "mlm")
  assert (batch["labels"] >= 0).sum() > 50
  module, params = _init(_tiny("bert", len(bert_tok)), "mlm")
  losses = _overfit(module, params, mlm.make_loss_fn(module, slots=16), batch)
  assert losses[0] > 9.5                       # ~ln(30522) at init
  assert losses[-1] < 0.5 * losses[0], losses


def test_clm_overfits_a_fixed_batch(gpt_tok):
  batch = _first_batch(gpt_tok, "clm")
  module, params = _init(_tiny("gpt2", len(gpt_tok)), "lm")
  losses = _overfit(module, params, clm.make_loss_fn(module), batch)
  assert losses[0] > 10                        # ~ln(50257) at init
  assert losses[-1] < 0.5 * losses[0], losses


# ----------------------------------------------------------------------------- loss definitions

def test_mlm_head_on_masked_slots_equals_the_full_head(bert_tok):
  """Gathering the masked positions before the head changes nothing (reference: full logits)."""
  batch = _first_batch(bert_tok, "mlm")
  module, params = _init(_tiny("bert", len(bert_tok)), "mlm")
  slots = mlm.prediction_slots(64, 0.15, False)
  metrics = lambda n: jax.jit(mlm.make_eval_fn(module, n))(params, batch)
  got = metrics(slots)
  out, _ = jax.jit(lambda p, b: module.apply({"params": p}, b["input_ids"], b["input_mask"],
                                             position_ids=b["position_ids"],
                                             segment_ids=b["segment_ids"]))(params, batch)
  logp = _log_softmax(out["logits"])
  lab = batch["labels"]
  nll = -np.take_along_axis(np.asarray(logp), np.maximum(lab, 0)[..., None], -1)[..., 0]
  want = nll[lab >= 0].mean()
  assert got["loss"] == pytest.approx(want, rel=1e-5)
  assert int(got["mlm_dropped"]) == 0 and float(got["weight"]) == (lab >= 0).sum()
  few = metrics(2)                                            # too few slots: counted
  assert int(few["mlm_dropped"]) == np.maximum((lab >= 0).sum(1) - 2, 0).sum() > 0


def test_packed_clm_loss_equals_the_sum_of_unpacked_documents():
  rng = np.random.default_rng(0)
  docs = [rng.integers(1, 97, n).astype(np.int32) for n in (7, 12, 5)]
  module, params = _init(_tiny("gpt2", 97), "lm")
  loss_fn = jax.jit(lambda p, b, f=clm.make_loss_fn(module): f(p, b, None, False))
  packed = data.pack_stream(docs, 32, pad_id=0)              # one row, 24 real tokens + padding
  packed["labels"] = data.next_token_labels(packed["input_ids"], packed["segment_ids"])
  loss, m = loss_fn(params, packed)
  total_packed = float(loss) * float(m["weight"])
  total_alone = 0.0
  apply = jax.jit(lambda p, x: module.apply({"params": p}, x)[0])
  for d in docs:                                              # each document alone, no segments
    out = apply(params, d[None])
    logp = _log_softmax(out["logits"][0])
    total_alone += -logp[np.arange(len(d) - 1), d[1:]].sum()
  assert float(m["weight"]) == sum(len(d) - 1 for d in docs)
  assert total_packed == pytest.approx(total_alone, rel=1e-5)
  leaky = dict(packed, segment_ids=(packed["segment_ids"] > 0).astype(np.int32))
  leaky_loss, _ = loss_fn(params, leaky)                     # attention across documents
  assert abs(float(leaky_loss) * float(m["weight"]) - total_alone) > 1e-3


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_bf16_loss_within_tolerance_of_fp32(objective, bert_tok, gpt_tok):
  tok, arch = (bert_tok, "bert") if objective == "mlm" else (gpt_tok, "gpt2")
  batch = _first_batch(tok, objective)
  args = _tiny(arch, len(tok), num_layers=2, initializer_range=0.2)   # peaked logits
  module, params = _init(args, mlm.HEAD if objective == "mlm" else clm.HEAD)
  make = (lambda m: mlm.make_loss_fn(m, 16)) if objective == "mlm" else clm.make_loss_fn
  losses = {}
  for dtype in ("float32", "bfloat16"):
    m = models.build(ModelArgs(**dict(args.__dict__, dtype=dtype)), module.head)
    losses[dtype] = float(jax.jit(lambda p, b, f=make(m): f(p, b, None, False)[0])(params, batch))
  assert losses["bfloat16"] != losses["float32"]              # bf16 really computed
  assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=BF16_RTOL)


@pytest.mark.parametrize("objective,remat", [("mlm", "full"), ("clm", "dots")])
def test_remat_and_accumulation_give_the_same_gradients(objective, remat, bert_tok, gpt_tok):
  """remat (with dropout: the recomputed masks must match) and 2 micro-batches vs plain."""
  tok, arch = (bert_tok, "bert") if objective == "mlm" else (gpt_tok, "gpt2")
  batch = _first_batch(tok, objective)
  args = _tiny(arch, len(tok), dropout=0.1)
  head = mlm.HEAD if objective == "mlm" else clm.HEAD
  _, params = _init(args, head)
  make = (lambda m: mlm.make_loss_fn(m, 16)) if objective == "mlm" else clm.make_loss_fn

  def grads(remat, accum=1):
    module = models.build(ModelArgs(**dict(args.__dict__, remat=remat)), head)
    fn = jax.value_and_grad(lambda p, b, r: make(module)(p, b, r, True), has_aux=True)
    run = lambda p, b: optim.accumulate_gradients(fn, p, b, jax.random.key(3), accum)
    return jax.jit(run)(params, batch)[1]

  ref = grads("none")                  # with dropout
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(grads(remat))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
  # Accumulation splits rows j, j+2, ...: each micro-batch draws its own dropout, so compare
  # without dropout against the token-weighted full batch.
  args = ModelArgs(**dict(args.__dict__, dropout_rate=0.0, attention_dropout_rate=0.0))
  ref, acc = grads("none"), grads("none", accum=2)   # `grads` reads the new `args`
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(acc)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- sampling

def _reference_greedy(module, params, prompt, n):
  """Argmax decoding by re-running the model on the growing sequence (no buffer, no loop)."""
  ids = list(prompt)
  apply = jax.jit(lambda p, x: module.apply({"params": p}, x)[0]["logits"])
  for _ in range(n):
    ids.append(int(np.argmax(apply(params, np.array([ids], np.int32))[0, -1])))
  return ids[len(prompt):]


def test_sampling_fixed_seed_deterministic_and_top_k_1_is_greedy():
  module, params = _init(_tiny("gpt2", 50), "lm")
  prompts, n = [[3, 4, 5], [7]], 5
  fns = {}

  def run(seed=0, **kw):
    args = sampling.SampleArgs(n, **kw)
    fn = fns.setdefault(args, jax.jit(sampling.make_sample_fn(module, args)))
    batch = sampling.prompt_batch(prompts, n, seed=seed, pad_id=0)
    return sampling.continuations(np.asarray(fn(params, batch)), batch["prompt_len"], n, None)

  greedy = run(temperature=0.0)
  for p, g in zip(prompts, greedy):
    assert g == _reference_greedy(module, params, p, n)
  assert run(temperature=0.7, top_k=1) == greedy
  sampled = run(temperature=1.5)
  assert run(temperature=1.5) == sampled                      # same seed, same samples
  assert sampled != greedy and run(seed=1, temperature=1.5) != sampled


def test_filter_logits_matches_numpy():
  logits = np.random.default_rng(0).normal(size=(4, 30)).astype(np.float32)
  k = np.asarray(sampling.filter_logits(jnp.asarray(logits), top_k=5))
  for row, got in zip(logits, k):
    assert set(np.flatnonzero(np.isfinite(got))) == set(np.argsort(-row)[:5])
  p = np.asarray(sampling.filter_logits(jnp.asarray(logits), top_p=0.6))
  for row, got in zip(logits, p):
    probs = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
    order = np.argsort(-probs)
    n = int(np.searchsorted(np.cumsum(probs[order]), 0.6) + 1)   # smallest set reaching 0.6
    assert set(np.flatnonzero(np.isfinite(got))) == set(order[:n])


# ----------------------------------------------------------------------------- data and vocab

def test_mixture_resumes_exactly_and_follows_corpus_sizes(bert_tok):
  cfg = dict(dataset="text:shakespeare,text:conll2003", batch_size=8, max_len=64, seed=1,
             objective="mlm", cache_dir=CACHE)
  mix, held_out = pretrain_data.make_iterators(cfg, bert_tok)
  assert sorted(held_out) == ["text:conll2003", "text:shakespeare"]
  sizes = {n: len(p) for n, p in mix.parts.items()}
  assert len(mix) == sum(sizes.values())
  [next(mix) for _ in range(7)]
  state = json.loads(json.dumps(mix.get_state()))
  want = [next(mix) for _ in range(5)]
  again, _ = pretrain_data.make_iterators(cfg, bert_tok)
  again.set_state(state)
  for x, y in zip(want, [next(again) for _ in range(5)]):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
  order = again._plan(0)                      # pylint: disable=protected-access
  assert np.bincount(order).tolist() == [sizes["text:shakespeare"], sizes["text:conll2003"]]
  with pytest.raises(ValueError, match="text:nope"):
    pretrain_data.dataset_names("text:brown,text:nope")


def test_trained_vocabularies_load_as_hf_tokenizers(tmp_path):
  texts = ["The quick brown fox jumps over the lazy dog.", "Is this the real life?"] * 50
  wp = pretrain_data.train_wordpiece(texts, 120, str(tmp_path / "wp"))
  assert wp.pad_token_id == 0 and wp.mask_token_id is not None and len(wp) <= 120
  assert wp.decode(wp("The lazy FOX")["input_ids"], skip_special_tokens=True) == "the lazy fox"
  bpe = pretrain_data.train_bpe(texts, 300, str(tmp_path / "bpe"))
  assert bpe.eos_token_id == 0 and len(bpe) <= 300
  text = "The real dog, jumping?\nÜber"
  assert bpe.decode(bpe(text)["input_ids"]) == text           # byte-level: lossless


# ----------------------------------------------------------------------------- whole runs

def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "device_count" not in f)
  return env


def _script(name, *args):
  proc = subprocess.run([sys.executable, os.path.join(REPO, "research", name), *args], cwd=REPO,
                        env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  return proc.stdout + proc.stderr


TINY = dict(num_layers=1, hidden_size=32, num_heads=2, mlp_dim=64)


def _tiny_run_config(cfg, dataset="text:shakespeare"):
  cfg.data.update(dataset=dataset, cache_dir=CACHE, max_len=64, batch_size=8, eval_batch_size=8,
                  eval_batches=2)
  cfg.train.update(num_steps=6, log_every=3, eval_every=3, checkpoint_every=3, peak_flops=0.0)
  cfg.optim.lr = 3e-3
  return cfg


@pytest.mark.slow
def test_mlm_run_writes_a_checkpoint_that_finetuning_starts_from(tmp_path):
  cfg = _tiny_run_config(mlm_config.get_config(""))
  cfg.mesh.update(data=2, fsdp=2, tensor=2)    # the sharding rules on 8 simulated devices
  args = models.args_from_config(dict(common.model_config("bert-tiny"), **TINY))
  workdir = str(tmp_path / "mlm")
  out = pretrain.run(cfg, workdir, model_args=args)
  assert out["train"]["steps"] == 6 and out["train"]["tokens_per_s"] > 0
  assert out["train"]["packing"]["fill_fraction"] >= 0.99
  assert 0 < out["held_out"]["accuracy"] < 1 and out["held_out"]["shakespeare/weight"] > 0
  for name in ("metrics.json", "curves.png", "metrics.jsonl", "model.json"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  meta = model_io.read_model_json(workdir)
  assert meta["head"] == "mlm" and meta["tokenizer"] == "minilm"
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert {"tokens_per_s", "fill"} <= set(next(r for r in rows if r["kind"] == "train" and
                                              "tokens_per_s" in r))
  # The saved encoder, read straight from the checkpoint, is what a token classifier starts from.
  abstract = jax.eval_shape(lambda: models.init_params(models.build(args, "mlm"),
                                                       jax.random.key(0))[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.
                                                         SingleDeviceSharding(jax.devices()[0])),
                          abstract)
  saved = checkpoint.restore_params(os.path.join(workdir, "checkpoints"), abstract)
  loaded = model_io.load_model(workdir, "token_cls", 9)
  for a, b in zip(jax.tree.leaves(saved["encoder"]), jax.tree.leaves(loaded.params["encoder"])):
    np.testing.assert_array_equal(a, b)
  assert loaded.params["classifier"]["kernel"].shape == (32, 9)
  # A fine-tuning run (what research/finetune.py runs) from the workdir at lr 1e-30 (the config
  # check wants lr > 0; an update of ~1e-30 is far below float32 resolution): its checkpoint
  # keeps the encoder bit for bit, and it found the tokenizer through model.json.
  ft_cfg = sst2_config.get_config("quick")
  ft_cfg.model.init_from = workdir
  ft_cfg.optim.lr = 1e-30
  ft_cfg.train.num_steps = 2
  ft_cfg.data.update(max_train_examples=64, batch_size=8, cache_dir=CACHE)
  ft = str(tmp_path / "ft")
  finetune.run(ft_cfg, ft, source=workdir)
  after = model_io.load_model(ft, "seq_cls", 2)
  for a, b in zip(jax.tree.leaves(saved["encoder"]), jax.tree.leaves(after.params["encoder"])):
    np.testing.assert_array_equal(a, b)
  # Pinned to the checkpoint it started from: pretraining reports (and hands on) its final state.
  assert model_io.read_model_json(ft)["init_from"] == f"{workdir}@{out['train']['steps']}"


@pytest.mark.slow
def test_clm_script_samples_and_generate_loads_the_workdir(tmp_path):
  workdir = str(tmp_path / "clm")
  cfg = [f"--config.data.{k}={v}" for k, v in dict(
      dataset="text:shakespeare", cache_dir=CACHE, max_len=64, batch_size=8, eval_batch_size=8,
      eval_batches=2).items()]
  log = _script("pretrain_mlm.py", "--config=configs/clm.py:quick", f"--workdir={workdir}",
                *cfg, "--config.train.num_steps=4", "--config.train.eval_every=4",
                "--config.train.log_every=2", "--config.vocab.size=400",
                "--config.samples.max_new_tokens=8",
                *[f"--config.model.size.{k}={v}" for k, v in TINY.items()])
  assert "[greedy] 'ROMEO:' ->" in log and "[T=0.8 top_k=40 top_p=0.95] 'ROMEO:' ->" in log
  assert "tokens_per_s" in log and " mfu " in log
  assert re.search(r"packing: (99\.\d\d|100\.00)% of the training tokens are real", log)
  samples = open(os.path.join(workdir, "samples.txt")).read()
  assert samples.startswith("== step 4 ==") and samples.count("->") == 4
  metrics = json.load(open(os.path.join(workdir, "metrics.json")))
  h = metrics["held_out"]
  assert h["perplexity"] == pytest.approx(np.exp(h["loss"]), rel=1e-6)
  assert model_io.read_model_json(workdir)["tokenizer"] == os.path.join(workdir, "tokenizer")
  # generate.py with top-k=1 on the same prompts (same batch shape) reproduces the greedy samples
  # printed at the last evaluation.
  out = _script("generate.py", f"--model={workdir}", "--prompt=ROMEO:",
                "--prompt=The jury said that", "--max_new_tokens=8", "--top_k=1",
                "--temperature=0.7")
  lines = [l.split("] ", 1)[1] for l in out.splitlines() if l.startswith("[seed 0]")]
  assert len(lines) == 2
  for line in lines:
    assert f"[greedy] {line}" in samples


def test_configs_build_and_variants_apply():
  for variant in ("", "minilm", "wordpiece", "wwm+bf16+remat+accum4+quick"):
    c = mlm_config.get_config(variant)
    assert c.objective == "mlm"
  assert mlm_config.get_config("minilm").model.init_from == "minilm"
  c = clm_config.get_config("gpt2bpe+bf16")
  assert c.objective == "clm" and c.vocab.size == 0 and c.model.dtype == "bfloat16"
  with pytest.raises(ValueError, match="valid"):
    mlm_config.get_config("nope")
