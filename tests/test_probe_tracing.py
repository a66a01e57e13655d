"""lib/probe/tracing.py and the facts corpus split: ROME token roles by hand, the query-template
hold-out, and the facts mode's plumbing (corpus -> CLM pretraining -> recall -> trace) on a tiny
GPT trained for a few steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import probe as probe_config
from lib import model_io
from lib.probe import facts, patching, tracing


def test_token_roles_by_hand():
  # tokens: [The] [pet] [of] [Ba] [ko] [Zi] [is] [a] [pad]; subject = Ba ko Zi
  subject = np.array([[0, 0, 0, 1, 1, 1, 0, 0, 0]])
  mask = np.array([[1, 1, 1, 1, 1, 1, 1, 1, 0]])
  names = ["first token", "before subject", "before subject", "subject first", "subject middle",
           "subject last", "first after subject", "last token"]
  assert list(patching.token_roles(subject, mask)[0]) == [patching.ROLES.index(n)
                                                          for n in names] + [-1]
  # Subject at the start and a further token after it.
  subject = np.array([[1, 1, 0, 0, 0]])
  roles = patching.token_roles(subject, np.ones((1, 5), int))[0]
  assert [patching.ROLES[r] for r in roles] == ["subject first", "subject last",
                                                "first after subject", "further after",
                                                "last token"]


def test_query_template_held_out_for_the_other_subjects():
  fs = facts.make_facts(20, relations=3, seed=2)
  q, held = facts.split_subjects(fs, 0.25, seed=2)
  assert len(q) == 5 and len(held) == 15 and not q & held
  docs = facts.corpus(fs, repeats=8, seed=2, query_subjects=q)
  text = "\n".join(docs)
  for f in fs:
    before, subj, after = facts.query(f)
    if f.subject in held:
      assert f"{before}{subj}{after}" not in text
  # Most query-trained facts (8 draws of 4 templates) appear in the query template, answered.
  seen = [facts.statement(f) in docs for f in fs if f.subject in q]
  assert np.mean(seen) > 0.7


def _tiny_cfg(tmp_path):
  cfg = probe_config.get_config("quick")
  fc = cfg.facts
  fc.subjects, fc.relations, fc.objects, fc.repeats = 8, 2, 3, 2
  fc.trace, fc.benchmark_facts, fc.chunk, fc.max_len = 3, 1, 2, 48
  c = fc.clm
  c.model.size.update(num_layers=2, hidden_size=32, num_heads=2, mlp_dim=64, max_len=64)
  c.vocab.size, c.data.max_len, c.data.batch_size, c.data.eval_batches = 300, 32, 8, 1
  c.train.num_steps, c.train.eval_every, c.train.checkpoint_every, c.train.log_every = 4, 4, 4, 2
  c.train.peak_flops = 1e9
  return cfg


@pytest.mark.slow
def test_facts_plumbing_on_a_tiny_gpt(tmp_path):
  cfg = _tiny_cfg(tmp_path)
  fs, held, corpus_dir = tracing.write_corpus(cfg.facts, str(tmp_path), cfg.seed)
  train_text = open(f"{corpus_dir}/train.txt", encoding="utf-8").read()
  assert len(held) == 8 and held[0].subject in train_text
  assert facts.statement(held[0]).split(held[0].subject)[0] + held[0].subject not in train_text
  metrics = tracing.train_gpt(cfg, corpus_dir, str(tmp_path / "gpt"))
  assert metrics["train"]["steps"] == 4
  m = model_io.load_for_inference(str(tmp_path / "gpt"), data_dir=cfg.data_dir)
  assert m.args.num_layers == 2 and m.args.hidden_size == 32
  ok = tracing.recall(m.module, m.params, held, m.tokenizer, 48)
  # Independent reference: autoregressive greedy decoding, one token at a time.
  tok = lambda s: list(m.tokenizer(s)["input_ids"])
  step = jax.jit(lambda ids: m.module.apply({"params": m.params}, ids[None],
                                            deterministic=True)[0]["logits"][0])
  for f, got in zip(held, ok):
    ids = tok("".join(facts.query(f)).rstrip())
    want = tok(" " + f.obj)
    for _ in want:   # right padding is invisible to a causal model: one compiled shape
      logits = step(jnp.asarray(ids + [0] * (48 - len(ids))))
      ids.append(int(jnp.argmax(logits[len(ids) - 1])))
    assert bool(got) == (ids[-len(want):] == want)
  grid, subject, mask, summary = tracing.trace(m, held[:3], cfg.facts, 0, lambda s: None)
  assert summary["benchmark"]["max_abs_diff"] < 1e-6
  assert grid["mlp"].shape == (3, 2, mask.shape[1]) and subject.shape == mask.shape
  # The clean score by hand: softmax of the plain forward's logits at the last query token.
  b, _ = tracing.query_batch(held[:3], m.tokenizer, 48)
  out, _ = m.module.apply({"params": m.params}, jnp.asarray(b["input_ids"]),
                          input_mask=jnp.asarray(b["input_mask"]), deterministic=True)
  logits = np.asarray(out["logits"], np.float64)[np.arange(3), b["target_pos"]]
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p = p[np.arange(3), b["target"]] / p.sum(-1)
  np.testing.assert_allclose(grid["clean"], p, atol=1e-6)
