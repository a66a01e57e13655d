"""Pretraining inputs: a resumable mixture of packed text corpora, and training a new vocabulary."""

import os
from typing import Sequence

import numpy as np
from absl import logging

from lib import data, distributed, hf

WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
BPE_EOS = "<|endoftext|>"


def dataset_names(spec: str) -> list:
  """'text:brown,text:shakespeare' -> ['text:brown', 'text:shakespeare'] (each must be text:*:
  a named corpus, or text:<file|folder> of own plain text).

  Raises:
    ValueError: an empty spec, a repeated name or a dataset that is not a plain-text corpus.
  """
  names = [s.strip() for s in spec.split(",") if s.strip()]
  corpora = [d for d in data.DATASETS if d.startswith("text:")]
  bad = [n for n in names if n not in corpora and not (n.startswith("text:") and n[5:]
                                                       and os.path.exists(n[5:]))]
  if not names or bad or len(set(names)) != len(names):
    raise ValueError(f"data.dataset={spec!r}: expected a comma-separated list of distinct corpora "
                     f"from {corpora} or text:<file|folder>" + (f"; unknown: {bad}" if bad else ""))
  return names


class Mixture:
  """Training iterators mixed by size: a mixture epoch takes each part's epoch of batches once,
  interleaved in an order shuffled by (seed, epoch), so every corpus is seen in proportion to its
  size. Exact resume through get_state/set_state (which include the parts' states)."""

  def __init__(self, parts: dict, seed: int):
    if not parts:
      raise ValueError("Mixture: no parts")
    self.parts, self.seed = dict(parts), seed
    self.names = list(self.parts)
    self._epoch, self._index = 0, 0
    self._order = self._plan(0)
    self.name = "mix(" + ";".join(p.name for p in self.parts.values()) + f";seed={seed})"
    self.info = {n: dict(p.info) for n, p in self.parts.items()}

  def _plan(self, epoch: int) -> np.ndarray:
    counts = [len(self.parts[n]) for n in self.names]
    order = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng([self.seed, epoch]).permutation(order)

  def __len__(self):
    return sum(len(p) for p in self.parts.values())

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._index >= len(self._order):
      self._epoch, self._index = self._epoch + 1, 0
      self._order = self._plan(self._epoch)
    part = self.names[self._order[self._index]]
    self._index += 1
    return next(self.parts[part])

  def get_state(self) -> dict:
    return {"pipeline": self.name, "epoch": self._epoch, "index": self._index,
            "parts": {n: p.get_state() for n, p in self.parts.items()}}

  def set_state(self, state: dict) -> None:
    if state.get("pipeline") != self.name:
      raise ValueError(f"iterator state is for pipeline {state.get('pipeline')!r}, "
                       f"not {self.name!r}")
    self._epoch, self._index = int(state["epoch"]), int(state["index"])
    self._order = self._plan(self._epoch)
    for n, s in state["parts"].items():
      self.parts[n].set_state(s)

  def reset(self) -> None:
    self._epoch, self._index, self._order = 0, 0, self._plan(0)
    for p in self.parts.values():
      p.reset()


def make_iterators(data_cfg: dict, tokenizer, *, shard_index: int = 0, shard_count: int = 1):
  """(training Mixture, {corpus: held-out iterator}) of the corpora in data_cfg['dataset'].

  Args:
    data_cfg: `lib.data.from_config` keywords (dataset may list several corpora); the held-out
      split is 'validation' of each corpus.
    tokenizer: BERT WordPiece (mlm) or byte-level BPE (clm).
    shard_index, shard_count: this process's shard of every corpus.
  """
  names = dataset_names(data_cfg["dataset"])
  kw = dict(shard_index=shard_index, shard_count=shard_count)
  train_parts = {n: data.from_config(dict(data_cfg, dataset=n), tokenizer, "train", train=True,
                                     **kw) for n in names}
  held_out = {n: data.from_config(dict(data_cfg, dataset=n), tokenizer, "validation", train=False,
                                  **kw) for n in names}
  if shard_count > 1:  # every host runs as many eval steps as the longest shard (dummy batches)
    held_out = {n: data.from_config(dict(data_cfg, dataset=n,
                                         steps_per_epoch=distributed.agree_int(len(it), "max")),
                                    tokenizer, "validation", train=False, **kw)
                for n, it in held_out.items()}
  return Mixture(train_parts, data_cfg.get("seed", 0) or 0), held_out


def packing_stats(mixture: Mixture) -> dict:
  """Non-padding fraction of one epoch of every part (`lib.data.padding_stats`), and overall."""
  per = {n: data.padding_stats(p) for n, p in mixture.parts.items()}
  real = sum(s["real_tokens"] for s in per.values())
  total = sum(s["total_tokens"] for s in per.values())
  return {"fill_fraction": real / max(total, 1), "real_tokens": real, "total_tokens": total,
          "per_corpus": {n: s["fill_fraction"] for n, s in per.items()}}


# ----------------------------------------------------------------------------- vocabularies

def corpus_texts(names: Sequence[str], data_dir: str, cache_dir=None) -> list:
  """The documents (str) of the training split of each corpus: what a new vocabulary learns from."""
  texts = []
  for name in names:
    src = data.load_split(name, "train", data_dir, cache_dir)
    texts += [_text(src[i]["text"]) for i in range(len(src))]
  return texts


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def train_wordpiece(texts: Sequence[str], vocab_size: int, out_dir: str, *, lowercase: bool = True,
                    min_frequency: int = 2):
  """Trains a BERT WordPiece vocabulary (tokenizers library) and saves it as a HF tokenizer dir.

  Specials are [PAD]=0, [UNK], [CLS], [SEP], [MASK] (so pad_token_id 0 as in BERT).

  Returns:
    the transformers BertTokenizerFast loaded back from `out_dir` (as every later run loads it).
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.BertWordPieceTokenizer(lowercase=lowercase, strip_accents=lowercase)
  tok.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=min_frequency,
                          special_tokens=list(WORDPIECE_SPECIALS), show_progress=False)
  os.makedirs(out_dir, exist_ok=True)
  tok.save_model(out_dir)                                                   # vocab.txt
  fast = transformers.BertTokenizerFast(vocab=tok.get_vocab(), do_lower_case=lowercase,
                                        strip_accents=lowercase)
  fast.save_pretrained(out_dir)
  logging.info("trained a WordPiece vocabulary of %d tokens on %d documents -> %s", len(fast),
               len(texts), out_dir)
  return hf.load_bert_tokenizer(out_dir)


def train_bpe(texts: Sequence[str], vocab_size: int, out_dir: str, *, min_frequency: int = 2):
  """Trains a GPT-2 style byte-level BPE (`<|endoftext|>` = id 0) and saves vocab.json + merges.txt.

  Returns:
    the GPT2TokenizerFast loaded back from `out_dir` (`hf.load_gpt2_tokenizer`).
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.ByteLevelBPETokenizer()
  tok.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=min_frequency,
                          special_tokens=[BPE_EOS], show_progress=False)
  os.makedirs(out_dir, exist_ok=True)
  tok.save_model(out_dir)                                                   # vocab.json, merges.txt
  loaded = hf.load_gpt2_tokenizer(out_dir)
  logging.info("trained a byte-level BPE of %d tokens on %d documents -> %s", len(loaded),
               len(texts), out_dir)
  return loaded


def train_vocabulary(arch: str, names: Sequence[str], data_dir: str, out_dir: str, vocab_size: int,
                     *, cache_dir=None, lowercase: bool = True, min_frequency: int = 2):
  """A new vocabulary for `arch` ('bert': WordPiece, 'gpt2': byte-level BPE) learnt from the
  training split of the corpora; an existing one in `out_dir` is loaded instead (resume)."""
  if arch == "bert":
    if os.path.exists(os.path.join(out_dir, "vocab.txt")):
      return hf.load_bert_tokenizer(out_dir)
    return train_wordpiece(corpus_texts(names, data_dir, cache_dir), vocab_size, out_dir,
                           lowercase=lowercase, min_frequency=min_frequency)
  if arch == "gpt2":
    if os.path.exists(os.path.join(out_dir, "merges.txt")):
      return hf.load_gpt2_tokenizer(out_dir)
    return train_bpe(corpus_texts(names, data_dir, cache_dir), vocab_size, out_dir,
                     min_frequency=min_frequency)
  raise ValueError(f"train_vocabulary: unknown arch {arch!r}; valid: 'bert', 'gpt2'")
