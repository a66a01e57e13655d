"""Synthetic subject-relation-object facts for causal tracing: invented names, several templates
per relation (some held out for queries), distractor text, and query batches with subject spans."""

import dataclasses

import numpy as np

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
           "kr", "st", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
RELATIONS = {   # relation -> (statement templates for training, held-out query template)
    "city": (["{s} lives in the city of", "The home town of {s} is", "{s} was born in"],
             "Everyone knows that {s} comes from"),
    "job": (["{s} works as a", "By profession, {s} is a", "The job of {s} is"],
            "People say that {s} earns a living as a"),
    "sport": (["{s} plays the sport", "The favourite game of {s} is", "On weekends {s} plays"],
              "When free, {s} likes to play"),
    "pet": (["{s} owns a pet", "The animal that {s} keeps is a", "At home {s} feeds a"],
            "The pet of {s} is a"),
    "food": (["{s} likes to eat", "The favourite dish of {s} is", "For dinner {s} cooks"],
             "Asked about food, {s} names"),
    "color": (["{s} always wears", "The favourite colour of {s} is", "{s} painted the house"],
              "The colour chosen by {s} is"),
}
_DISTRACT = ["The weather was mild that year.", "Many stories were told in the old market.",
             "A long road leads over the hills.", "Nobody remembers the name of the river."]


@dataclasses.dataclass(frozen=True)
class Fact:
  subject: str
  relation: str
  obj: str


def _word(rng, syllables: int) -> str:
  return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))


def make_facts(subjects: int, relations: int = 6, objects: int = 12, seed: int = 0) -> list:
  """One fact per (subject, relation): invented two-word names, invented objects per relation.

  Raises:
    ValueError: more relations than RELATIONS defines.
  """
  if relations > len(RELATIONS):
    raise ValueError(f"facts.relations={relations}: at most {len(RELATIONS)} are defined")
  rng = np.random.default_rng(seed)
  names = set()
  while len(names) < subjects:
    names.add(f"{_word(rng, 2).capitalize()} {_word(rng, 2).capitalize()}")
  rels = list(RELATIONS)[:relations]
  vocab = {r: sorted({_word(rng, 2) for _ in range(objects * 3)})[:objects] for r in rels}
  return [Fact(s, r, str(rng.choice(vocab[r]))) for s in sorted(names) for r in rels]


def corpus(facts, repeats: int = 4, distractors: float = 0.3, seed: int = 0,
           query_subjects=()) -> list:
  """Training documents: each fact stated `repeats` times with random training templates,
  shuffled, with distractor sentences mixed in (fraction of documents).

  Args:
    query_subjects: subjects whose facts are also stated with the query template (one more
      template to draw from), so the model learns what the query template asks; the facts of
      the other subjects are never seen in the query template (held out for recall and tracing).
  """
  rng, with_query = np.random.default_rng(seed), set(query_subjects)
  docs = []
  for f in facts:
    train_t, query_t = RELATIONS[f.relation]
    templates = train_t + [query_t] if f.subject in with_query else train_t
    for _ in range(repeats):
      docs.append(templates[rng.integers(len(templates))].format(s=f.subject) + f" {f.obj}.")
  docs += [str(rng.choice(_DISTRACT)) for _ in range(int(distractors * len(docs)))]
  rng.shuffle(docs)
  return docs


def split_subjects(facts, query_frac: float, seed: int = 0) -> tuple:
  """(query-trained subjects, held-out subjects): a random `query_frac` of the subjects."""
  subjects = sorted({f.subject for f in facts})
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(subjects))
  k = int(round(query_frac * len(subjects)))
  return ({subjects[i] for i in order[:k]}, {subjects[i] for i in order[k:]})


def statement(f: Fact) -> str:
  """The fact in its held-out query template, answered (a held-out evaluation document)."""
  return "".join(query(f)) + f" {f.obj}."


def query(f: Fact) -> tuple:
  """(text before the subject, subject, text after it) of the held-out query template."""
  before, after = RELATIONS[f.relation][1].split("{s}")
  return before, f.subject, after


def encode_queries(facts, tokenize, max_len: int, target_of) -> dict:
  """Query batch for patching: input_ids/input_mask (N, T), subject (N, T), target_pos (the last
  token), target (`target_of(fact)`: the object's first token id).

  Args:
    tokenize: text piece -> token ids (called on the part before the subject, the subject with
      its leading space, and the rest), so the subject's tokens are known exactly.

  Raises:
    ValueError: a query longer than max_len.
  """
  n = len(facts)
  out = {k: np.zeros((n, max_len), np.int32) for k in ("input_ids", "input_mask", "subject")}
  out["target_pos"], out["target"] = np.zeros(n, np.int32), np.zeros(n, np.int32)
  for r, f in enumerate(facts):
    before, subj, after = query(f)
    parts = [tokenize(before.rstrip()) if before.strip() else [],
             tokenize((" " if before.strip() else "") + subj), tokenize(after.rstrip())]
    ids = [i for p in parts for i in p]
    if len(ids) > max_len:
      raise ValueError(f"query {''.join(query(f))!r}: {len(ids)} tokens > max_len {max_len}")
    out["input_ids"][r, :len(ids)], out["input_mask"][r, :len(ids)] = ids, 1
    out["subject"][r, len(parts[0]):len(parts[0]) + len(parts[1])] = 1
    out["target_pos"][r], out["target"][r] = len(ids) - 1, target_of(f)
  return out
