"""lib/attacks.py: deterministic for a seed, gold labels and entity words never changed, a constant
model is never fooled, the character edits and the report numbers checked by hand."""

import jax
import numpy as np
import pytest

from lib import attacks, data, model_io, models

SENTENCES = ["the movie was a wonderful surprise from start to finish",
             "a dull and tedious film with nothing new to say",
             "an honest and moving story about family",
             "the acting is terrible and the plot makes no sense at all"]


@pytest.fixture(scope="module")
def tokenizer():
  tok, _ = model_io.load_tokenizer("minilm", "bert", data.DEFAULT_DATA_DIR)
  return tok


def _victim(tokenizer, head, constant=False):
  args = models.ModelArgs(vocab_size=len(tokenizer), hidden_size=32, num_layers=1, num_heads=2,
                          mlp_dim=64, max_len=64, dropout_rate=0.0, attention_dropout_rate=0.0)
  module = models.build(args, head, 3)
  params, _ = models.init_params(module, jax.random.key(1))
  params = jax.tree.map(np.asarray, params)
  if constant:   # logits = bias: the same prediction (class 0) whatever the input
    params["classifier"]["kernel"] = np.zeros_like(params["classifier"]["kernel"])
    params["classifier"]["bias"] = np.array([2.0, 0.0, 0.0], np.float32)
  kind = "seq" if head == "seq_cls" else "token"
  return attacks.Victim(module, params, tokenizer, kind, batch_size=8), params, args


def _seq_examples(victim):
  """Gold = the model's own prediction, so that every example is attacked (none skipped)."""
  words = [s.split() for s in SENTENCES]
  return [(w, int(np.argmax(p))) for w, p in zip(words, victim.probs(words))]


@pytest.mark.parametrize("name", ["char", "word", "hotflip"])
def test_deterministic_for_a_seed_and_gold_untouched(tokenizer, name):
  victim, params, args = _victim(tokenizer, "seq_cls")
  nb = attacks.Neighbours(params, args, tokenizer)
  examples = _seq_examples(victim)
  budget = attacks.Budget(max_frac=0.5, neighbours=5, min_cos=-1.0)
  runs = [attacks.run_attack(name, victim, examples, budget, 3, nb) for _ in range(2)]
  assert [(r.perturbed, r.status, r.queries) for r in runs[0]] == \
         [(r.perturbed, r.status, r.queries) for r in runs[1]]
  for (words, gold), r in zip(examples, runs[0]):
    assert r.gold == gold and r.words == words and len(r.perturbed) == len(words)
    assert r.status in ("success", "failure")
    assert len(r.changed) <= budget.words(len(words))
  assert any(r.changed for r in runs[0])   # the attack did something


def test_token_attacks_never_touch_entity_words(tokenizer):
  victim, params, args = _victim(tokenizer, "token_cls")
  nb = attacks.Neighbours(params, args, tokenizer)
  words = "john smith flew to paris with his old friend on monday".split()
  pred = np.argmax(victim.probs([words])[0], -1)
  o_index = int(pred[3])           # call the tag of 'to' O: words tagged otherwise are entities
  examples = [(words, [int(t) for t in pred])]
  entity = [i for i, t in enumerate(pred) if t != o_index]
  for name in ("char", "word", "hotflip"):
    (r,) = attacks.run_attack(name, victim, examples, attacks.Budget(max_frac=1.0, min_cos=-1.0),
                              0, nb, o_index=o_index)
    assert r.gold == examples[0][1]
    assert all(r.perturbed[i] == words[i] for i in entity)
    assert not set(r.changed) & set(entity)


def test_a_constant_model_is_never_fooled(tokenizer):
  victim, params, args = _victim(tokenizer, "seq_cls", constant=True)
  nb = attacks.Neighbours(params, args, tokenizer)
  examples = [(s.split(), i % 2) for i, s in enumerate(SENTENCES)]   # gold 0 attacked, 1 skipped
  for name in ("char", "word", "hotflip"):
    s = attacks.summarize(attacks.run_attack(name, victim, examples,
                                             attacks.Budget(max_frac=1.0, min_cos=-1.0), 0, nb))
    assert s["attack_success_rate"] == 0.0 and s["successful_attacks"] == 0
    assert (s["failed_attacks"], s["skipped_attacks"]) == (2, 2)
    assert s["original_accuracy"] == 0.5 and s["accuracy_under_attack"] == 0.5


def test_char_edits_are_single_edits():
  rng = np.random.RandomState(0)
  for word in ["wonderful", "ab", "x", "film's"]:
    for cand in attacks.char_candidates(word, rng):
      assert cand != word
      d = len(cand) - len(word)
      if d == 1 or d == -1:          # insert / drop: removing one char of the longer gives the other
        long, short = (cand, word) if d == 1 else (word, cand)
        assert any(long[:i] + long[i + 1:] == short for i in range(len(long)))
      else:                          # swap of neighbours, or a keyboard neighbour
        diff = [i for i in range(len(word)) if word[i] != cand[i]]
        swapped = len(diff) == 2 and diff[1] == diff[0] + 1 and \
            word[diff[0]] == cand[diff[1]] and word[diff[1]] == cand[diff[0]]
        near = len(diff) == 1 and cand[diff[0]] in attacks.NEIGHBOURS[word[diff[0]]]
        assert swapped or near, (word, cand)
  assert set(attacks.NEIGHBOURS["s"]) == set("weadzx")
  assert set(attacks.NEIGHBOURS["p"]) == set("ol")
  assert attacks.char_candidates("...", rng) == []


def test_summary_numbers_by_hand():
  r = lambda status, changed, queries: attacks.Result(
      list("abcd"), 0, [("X" if i < changed else w) for i, w in enumerate("abcd")], status,
      queries, 0, 1)
  s = attacks.summarize([r("success", 1, 10), r("success", 2, 20), r("failure", 0, 30),
                         r("skipped", 0, 1)])
  assert (s["successful_attacks"], s["failed_attacks"], s["skipped_attacks"]) == (2, 1, 1)
  assert s["original_accuracy"] == 0.75 and s["accuracy_under_attack"] == 0.25
  assert s["attack_success_rate"] == pytest.approx(2 / 3)
  assert s["average_perturbed_word_percent"] == pytest.approx(37.5)   # (25 + 50) / 2
  assert s["average_queries"] == pytest.approx(20.0)                 # skipped not counted
