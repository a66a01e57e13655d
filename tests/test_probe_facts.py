"""lib/probe/facts.py: the generator's facts, templates and query spans; a trace on a tiny GPT."""

import jax
import jax.numpy as jnp
import numpy as np

from lib import models
from lib.probe import facts, patching


def test_facts_are_unique_per_subject_relation_and_queries_are_held_out():
  fs = facts.make_facts(30, relations=3, seed=0)
  assert len(fs) == 90 and len({(f.subject, f.relation) for f in fs}) == 90
  docs = facts.corpus(fs, repeats=2, seed=0)
  text = "\n".join(docs)
  for f in fs[:10]:
    before, subj, after = facts.query(f)
    assert f"{before}{subj}{after}" not in text       # the query template is never trained
    assert any(subj in d and d.endswith(f" {f.obj}.") for d in docs)
  assert sum(d in facts._DISTRACT for d in docs) > 0


def _word_tokenizer(fs):
  words = sorted({w for f in fs for w in ("".join(facts.query(f)) + " " + f.obj).split()})
  vocab = {w: i + 1 for i, w in enumerate(words)}
  return vocab, lambda text: [vocab[w] for w in text.split()]


def test_query_spans_and_a_trace_on_a_tiny_gpt():
  fs = facts.make_facts(3, relations=2, seed=1)[:3]
  vocab, tok = _word_tokenizer(fs)
  b = facts.encode_queries(fs, tok, 16, lambda f: vocab[f.obj])
  for r, f in enumerate(fs):
    ids = b["input_ids"][r][b["subject"][r] == 1]
    assert [w for w in f.subject.split()] == [k for i in ids for k, v in vocab.items() if v == i]
    assert b["target_pos"][r] == b["input_mask"][r].sum() - 1
  args = models.ModelArgs(arch="gpt2", hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64,
                          max_len=16, vocab_size=len(vocab) + 1, dropout_rate=0.0,
                          attention_dropout_rate=0.0, activation="gelu_new",
                          initializer_range=0.3)
  module = models.build(args, "lm")
  params, _ = models.init_params(module, jax.random.key(0))

  def score(out, rows):
    logits = jnp.take_along_axis(out["logits"], rows["target_pos"][:, None, None], 1)[:, 0]
    return jnp.take_along_axis(jax.nn.softmax(logits), rows["target"][:, None], 1)[:, 0]

  subject = b.pop("subject")
  batch = {k: jnp.asarray(v) for k, v in b.items()}
  noise = patching.embedding_noise(jax.random.key(1), subject, 32, 0.3)
  p = patching.Patcher(module, params, score)
  g = p.grid(batch, batch, noise, window=3, chunk=4)
  roles = patching.token_roles(subject, b["input_mask"])
  assert set(roles[0][b["input_mask"][0] == 1]) >= {0, 2, 4, 7}
  eff = patching.role_average(g["mlp"] - g["corrupt"][:, None, None], roles)
  assert eff.shape == (2, len(patching.ROLES))
  # Positions before the subject see no corruption in a causal model: no effect there.
  np.testing.assert_allclose(eff[:, 0], 0.0, atol=1e-6)
