"""Offline adversarial attacks on a trained classifier or tagger: DeepWordBug-style character edits,
TextFooler-style word substitution from the model's own word-embedding neighbours, HotFlip; and the
TextAttack-style report (original accuracy, accuracy under attack, success rate, % words perturbed,
average queries).

An example is (words, gold): gold is a label index (sequence classification) or a tag index per
word (token classification). Attacks keep the number of words, never touch a word whose gold tag
is an entity (token classification: only 'O' words change) and never change the gold; an example
the model gets wrong is skipped, one it gets right is attacked until the prediction is wrong
(success) or the budget is spent (failure). All randomness comes from `seed` and the example's
position: a run is deterministic.
"""

import dataclasses
import string
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lib.data import tokenize as tok_lib
from lib.tasks import common

ATTACKS = ("char", "word", "hotflip")
# Words the word-level attacks never replace (TextFooler skips stop words too).
STOPWORDS = frozenset(
    "a an the and or but if of at by for with about to from in on is are was were be been being "
    "it its this that these those i you he she we they me him her us them my your his our their "
    "not no nor do does did have has had so than too very can will just there here as".split())
KEYBOARD = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]


def _keyboard_neighbours() -> dict:
  """Letter -> the letters whose keys touch it on a QWERTY keyboard (rows staggered by 1/4 and
  3/4 of a key: 's' touches w e a d z x)."""
  offset = (0.0, 0.25, 0.75)
  pos = {c: (r, i + offset[r]) for r, row in enumerate(KEYBOARD) for i, c in enumerate(row)}
  touch = lambda a, b: (a[0] == b[0] and abs(a[1] - b[1]) == 1) or (
      abs(a[0] - b[0]) == 1 and abs(a[1] - b[1]) < 1)
  return {c: "".join(d for d in pos if d != c and touch(pos[c], pos[d])) for c in pos}


NEIGHBOURS = _keyboard_neighbours()


# ----------------------------------------------------------------------------- the victim

class Victim:
  """A model under attack: class probabilities of word lists, with a query counter.

  `kind` 'seq' gives (C,) probabilities per input, 'token' (n_words, C) (the first piece of each
  word, as the fine-tuning evaluation). Inputs are padded to lengths of multiples of 16 and to
  a power-of-two number of rows (at most `batch_size`), so that few shapes are compiled and a
  one-text query costs one row, not a whole batch.
  """

  def __init__(self, module, params, tokenizer, kind: str, batch_size: int = 32):
    self.module, self.params, self.kind, self.batch_size = module, params, kind, batch_size
    self.pieces = tok_lib.WordPieces(tokenizer)
    self.prefix, self.suffix = tok_lib.special_wrap(tokenizer)
    self.max_len = module.args.max_len
    self.queries = 0
    self._probs = jax.jit(self._probs_fn)
    self._grad = jax.jit(jax.grad(self._loss_fn, argnums=1))

  def encode(self, words: Sequence[str]):
    """(piece ids with specials, index of each word's first piece)."""
    ids, first = list(self.prefix), []
    for p in self.pieces(list(words)):
      first.append(len(ids))
      ids.extend(int(x) for x in p)
    ids.extend(self.suffix)
    if len(ids) > self.max_len:
      raise ValueError(f"attack input of {len(ids)} word pieces exceeds the model's max_len "
                       f"{self.max_len}: {' '.join(words)[:80]}...")
    return ids, first

  def _batch(self, encoded):
    t = max(16, -(-max(len(i) for i, _ in encoded) // 16) * 16)
    ids = np.zeros((len(encoded), t), np.int32)
    mask = np.zeros_like(ids)
    for r, (i, _) in enumerate(encoded):
      ids[r, :len(i)], mask[r, :len(i)] = i, 1
    return {"input_ids": ids, "input_mask": mask, "token_type_ids": np.zeros_like(ids)}

  def _probs_fn(self, params, batch):
    out, _ = common.apply_model(self.module, params, batch)
    return jax.nn.softmax(out["logits"].astype(jnp.float32), -1)

  def _loss_fn(self, params, delta, batch, target):
    """Cross-entropy of `target` ((B,) or (B, T), -1 = none) with `delta` on the embeddings."""
    probs = self._probs_fn(params, dict(batch, embedding_delta=delta))
    logp = jnp.log(jnp.take_along_axis(probs, jnp.maximum(target, 0)[..., None], -1)[..., 0])
    return -jnp.sum(jnp.where(target >= 0, logp, 0.0))

  def probs(self, inputs: Sequence[Sequence[str]]) -> list:
    """Class probabilities of each input (one query each)."""
    self.queries += len(inputs)
    out = []
    for s in range(0, len(inputs), self.batch_size):
      enc = [self.encode(w) for w in inputs[s:s + self.batch_size]]
      rows = min(self.batch_size, 1 << (len(enc) - 1).bit_length())
      batch = self._batch(enc + [enc[0]] * (rows - len(enc)))
      p = np.asarray(self._probs(self.params, batch))
      for r, (_, first) in enumerate(enc):
        out.append(p[r] if self.kind == "seq" else p[r, first])
    return out

  def embedding_grad(self, words, gold):
    """(gradient of the gold loss w.r.t. each word's first-piece embedding (n, D), piece ids);
    one query."""
    self.queries += 1
    ids, first = self.encode(words)
    batch = self._batch([(ids, first)])
    t = batch["input_ids"].shape[1]
    target = np.asarray(gold, np.int32)
    if self.kind == "token":
      full = np.full((1, t), -1, np.int32)
      full[0, first] = target
      target = full
    else:
      target = target.reshape(1)
    delta = jnp.zeros((1, t, self.module.args.hidden_size), jnp.float32)
    g = np.asarray(self._grad(self.params, delta, batch, jnp.asarray(target)))
    return g[0, first], [ids[f] for f in first]


# ----------------------------------------------------------------------------- goal

def gold_score(victim_kind: str, probs, gold) -> float:
  """Probability of the gold output: p(label), or the mean p(tag) over the words."""
  if victim_kind == "seq":
    return float(probs[gold])
  return float(np.mean(probs[np.arange(len(gold)), gold]))


def is_correct(victim_kind: str, probs, gold) -> bool:
  if victim_kind == "seq":
    return int(np.argmax(probs)) == int(gold)
  return bool((np.argmax(probs, -1) == np.asarray(gold)).all())


@dataclasses.dataclass
class Result:
  """One attacked example."""
  words: list
  gold: object
  perturbed: list
  status: str               # skipped | success | failure
  queries: int
  orig_pred: object
  adv_pred: object

  @property
  def changed(self) -> list:
    return [i for i, (a, b) in enumerate(zip(self.words, self.perturbed)) if a != b]


# ----------------------------------------------------------------------------- transformations

def char_candidates(word: str, rng: np.random.RandomState) -> list:
  """DeepWordBug's four edits of one word (at random positions): swap two neighbouring letters,
  drop a letter, insert a letter, replace a letter by a keyboard neighbour. Edits that would
  leave the word unchanged or empty are left out."""
  letters = [i for i, c in enumerate(word) if c.isalpha()]
  if not letters:
    return []
  out = []
  if len(word) >= 2:
    i = rng.randint(len(word) - 1)
    out.append(word[:i] + word[i + 1] + word[i] + word[i + 2:])
    i = letters[rng.randint(len(letters))]
    out.append(word[:i] + word[i + 1:])
  i = rng.randint(len(word) + 1)
  out.append(word[:i] + string.ascii_lowercase[rng.randint(26)] + word[i:])
  i = letters[rng.randint(len(letters))]
  near = NEIGHBOURS.get(word[i].lower(), "")
  if near:
    out.append(word[:i] + near[rng.randint(len(near))] + word[i + 1:])
  return [w for w in dict.fromkeys(out) if w and w != word]


class Neighbours:
  """Nearest whole-word vocabulary entries in the model's own word-embedding table (cosine)."""

  def __init__(self, params, args, tokenizer):
    self.table = word_embedding_table(params, args)                     # (V, D)
    vocab = tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), len(self.table)))))
    self.words = [(i, w) for i, w in enumerate(vocab)
                  if w.isalpha() and w.isascii() and len(w) >= 2 and w not in STOPWORDS]
    self.ids = np.array([i for i, _ in self.words])
    unit = self.table / np.maximum(np.linalg.norm(self.table, axis=1, keepdims=True), 1e-12)
    self.unit = unit.astype(np.float32)
    self.index = {w: i for i, w in self.words}

  def of(self, word: str, k: int, min_cos: float) -> list:
    """Up to `k` neighbours of `word` (a single-piece vocabulary word) with cosine >= min_cos."""
    i = self.index.get(word.lower())
    if i is None:
      return []
    cos = self.unit[self.ids] @ self.unit[i]
    order = np.argsort(-cos)
    return [self.words[j][1] for j in order[:k + 1] if self.ids[j] != i and cos[j] >= min_cos][:k]


def word_embedding_table(params, args) -> np.ndarray:
  """The (vocab_size, hidden_size) leaf of the parameters: found by its shape, which must be
  unique (raises otherwise), never by a parameter name."""
  leaves = [np.asarray(x) for x in jax.tree.leaves(params)
            if getattr(x, "shape", None) == (args.vocab_size, args.hidden_size)]
  if len(leaves) != 1:
    raise ValueError(f"expected one ({args.vocab_size}, {args.hidden_size}) word-embedding table "
                     f"in the parameters, found {len(leaves)}")
  return leaves[0].astype(np.float32)


# ----------------------------------------------------------------------------- the attacks

@dataclasses.dataclass
class Budget:
  """How far an attack may go: a share of the words (at least one word), neighbours per word,
  their cosine floor, and HotFlip's candidate swaps verified per step."""
  max_frac: float = 0.25
  neighbours: int = 20
  min_cos: float = 0.5
  flips_tried: int = 5

  def words(self, n: int) -> int:
    return max(1, int(self.max_frac * n))


def _attackable(words, gold, kind, o_index, word_level: bool):
  keep = []
  for i, w in enumerate(words):
    if kind == "token" and gold[i] != o_index:
      continue                               # entity words are never changed: the gold holds
    if word_level and (not w.isalpha() or w.lower() in STOPWORDS):
      continue
    if not any(c.isalpha() for c in w):
      continue
    keep.append(i)
  return keep


def _importance(victim, words, gold, positions, unk: str, base: float) -> list:
  """Positions by how much replacing the word with [UNK] lowers p(gold) from `base`, the gold
  score of `words` (largest first)."""
  if not positions:
    return []
  probs = victim.probs([words[:i] + [unk] + words[i + 1:] for i in positions])
  drop = [base - gold_score(victim.kind, p, gold) for p in probs]
  return [positions[j] for j in np.argsort(-np.asarray(drop), kind="stable")]


def greedy_attack(victim, words, gold, probs, candidates: Callable, positions, budget: int,
                  unk: str):
  """TextAttack's greedy word-importance search: words in importance order, each replaced by the
  candidate that lowers p(gold) most (kept only if it does), until the prediction is wrong.
  `probs` are the victim's probabilities of `words` (already queried).
  Returns (perturbed words, probabilities of them)."""
  cur = list(words)
  score, changed = gold_score(victim.kind, probs, gold), 0
  for i in _importance(victim, cur, gold, positions, unk, score):
    if changed >= budget or not is_correct(victim.kind, probs, gold):
      break
    texts = [cur[:i] + [c] + cur[i + 1:] for c in candidates(cur[i], i)]
    if not texts:
      continue
    ps = victim.probs(texts)
    scores = [gold_score(victim.kind, p, gold) for p in ps]
    j = int(np.argmin(scores))
    if scores[j] < score:
      cur, probs, score, changed = texts[j], ps[j], scores[j], changed + 1
  return cur, probs


def hotflip(victim, words, gold, probs, nb: Neighbours, positions, budget: "Budget",
            n_budget: int):
  """HotFlip (Ebrahimi et al. 2018) on whole words: the first-order loss increase of swapping
  word p for vocabulary word v is (e_v - e_p) . dL/de_p; the best `flips_tried` swaps are
  verified with the model and the best kept, until the prediction is wrong or no swap helps.
  `probs` are the victim's probabilities of `words` (already queried)."""
  cur = list(words)
  score = gold_score(victim.kind, probs, gold)
  table = nb.table[nb.ids]                                               # (Vc, D)
  for _ in range(n_budget):
    if not is_correct(victim.kind, probs, gold):
      break
    free = [p for p in positions if cur[p] == words[p] and cur[p].lower() in nb.index]
    if not free:
      break
    g, ids = victim.embedding_grad(cur, gold)
    gain = table @ g[free].T - np.einsum("pd,pd->p", nb.table[[ids[p] for p in free]], g[free])
    gain[np.isin(nb.ids, [ids[p] for p in free])] = -np.inf               # no identity swaps
    top = np.argsort(-gain, axis=None)[:budget.flips_tried]
    texts = []
    for flat in top:
      v, p = np.unravel_index(flat, gain.shape)
      texts.append(cur[:free[p]] + [nb.words[v][1]] + cur[free[p] + 1:])
    ps = victim.probs(texts)
    scores = [gold_score(victim.kind, q, gold) for q in ps]
    j = int(np.argmin(scores))
    if scores[j] >= score:
      break
    cur, probs, score = texts[j], ps[j], scores[j]
  return cur, probs


def attack_example(name: str, victim, nb: Optional[Neighbours], words, gold, budget: Budget,
                   rng: np.random.RandomState, o_index: int = -1, unk: str = "[UNK]") -> Result:
  """One example under attack `name` (char | word | hotflip)."""
  start = victim.queries
  probs = victim.probs([words])[0]
  pred = np.argmax(probs, -1).tolist()
  if not is_correct(victim.kind, probs, gold):
    return Result(list(words), gold, list(words), "skipped", victim.queries - start, pred, pred)
  positions = _attackable(words, gold, victim.kind, o_index, word_level=name != "char")
  n = budget.words(len(words))
  if name == "char":
    cur, probs = greedy_attack(victim, words, gold, probs, lambda w, i: char_candidates(w, rng),
                               positions, n, unk)
  elif name == "word":
    cur, probs = greedy_attack(victim, words, gold, probs,
                               lambda w, i: nb.of(w, budget.neighbours, budget.min_cos),
                               positions, n, unk)
  elif name == "hotflip":
    cur, probs = hotflip(victim, words, gold, probs, nb, positions, budget, n)
  else:
    raise ValueError(f"unknown attack {name!r}; valid: {list(ATTACKS)}")
  status = "failure" if is_correct(victim.kind, probs, gold) else "success"
  return Result(list(words), gold, cur, status, victim.queries - start, pred,
                np.argmax(probs, -1).tolist())


def run_attack(name: str, victim, examples, budget: Budget, seed: int, nb=None, o_index=-1,
               unk="[UNK]") -> list:
  """Results of attack `name` on every (words, gold) example; example j draws from
  RandomState([seed, j])."""
  return [attack_example(name, victim, nb, list(w), g, budget, np.random.RandomState([seed, j]),
                         o_index, unk) for j, (w, g) in enumerate(examples)]


def summarize(results: Sequence[Result]) -> dict:
  """TextAttack's summary numbers of a list of results."""
  count = lambda s: sum(r.status == s for r in results)
  n, ok, bad, skip = len(results), count("success"), count("failure"), count("skipped")
  attacked = [r for r in results if r.status != "skipped"]
  won = [r for r in results if r.status == "success"]
  return {
      "examples": n, "successful_attacks": ok, "failed_attacks": bad, "skipped_attacks": skip,
      "original_accuracy": (n - skip) / max(n, 1),
      "accuracy_under_attack": bad / max(n, 1),
      "attack_success_rate": ok / max(ok + bad, 1),
      "average_perturbed_word_percent": float(np.mean(
          [100.0 * len(r.changed) / len(r.words) for r in won])) if won else 0.0,
      "average_words_per_input": float(np.mean([len(r.words) for r in results])) if n else 0.0,
      "average_queries": float(np.mean([r.queries for r in attacked])) if attacked else 0.0,
  }


def report_text(name: str, summary: dict) -> str:
  """The summary as TextAttack prints it."""
  rows = [("Number of successful attacks", summary["successful_attacks"]),
          ("Number of failed attacks", summary["failed_attacks"]),
          ("Number of skipped attacks", summary["skipped_attacks"]),
          ("Original accuracy", f"{100 * summary['original_accuracy']:.2f}%"),
          ("Accuracy under attack", f"{100 * summary['accuracy_under_attack']:.2f}%"),
          ("Attack success rate", f"{100 * summary['attack_success_rate']:.2f}%"),
          ("Average perturbed word %", f"{summary['average_perturbed_word_percent']:.2f}%"),
          ("Average num. words per input", f"{summary['average_words_per_input']:.2f}"),
          ("Avg num queries", f"{summary['average_queries']:.2f}")]
  return "\n".join([f"== attack: {name} =="] + [f"| {k:<30} | {v:>10} |" for k, v in rows])


def example_text(r: Result, label_names: Sequence[str]) -> str:
  """original / perturbed with the changed words in [[ ]], gold and predictions by name."""
  name = lambda x: (label_names[x] if not isinstance(x, list)
                    else " ".join(label_names[i] for i in x))
  mark = lambda ws: " ".join(f"[[{w}]]" if i in r.changed else w for i, w in enumerate(ws))
  gold = r.gold.tolist() if isinstance(r.gold, np.ndarray) else r.gold
  return "\n".join([f"[{r.status}] gold: {name(gold)}",
                    f"  original  ({name(r.orig_pred)}): {mark(r.words)}",
                    f"  perturbed ({name(r.adv_pred)}): {mark(r.perturbed)}"])
