"""Batch iterators: tokenise a split once, deterministic (seed, epoch) batch plans, buckets, resumable state."""

import collections
import hashlib
import io
import json
import logging
import os
from typing import Callable, Optional

import grain
import numpy as np

from lib import atomic
from lib.data import builders, own, packing, sources
from lib.data import tokenize as tok_lib
from lib.data import transforms as T
from lib.data.builders import DEFAULT_DATA_DIR, REPO_ROOT  # noqa: F401  (re-exported)
from lib.data.sources import LABEL_KEY  # noqa: F401  (re-exported)

_FEATURE_CACHE = collections.OrderedDict()   # tokenised splits, so a second iterator costs nothing
_FEATURE_CACHE_SIZE = 8
# Part of every tokenised-features cache key: bump when tokenisation, windowing or feature layout changes.
FEATURES_VERSION = "2"


# ---------------------------------------------------------------- sharding and reading

def shard_range(n: int, shard_index: int, shard_count: int) -> tuple:
  """Contiguous [start, end) of shard `shard_index` of `shard_count` over n examples (sizes differ by <= 1)."""
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
  return n * shard_index // shard_count, n * (shard_index + 1) // shard_count


def read_shard(source, shard_index: int = 0, shard_count: int = 1, limit: int = 0) -> list:
  """The examples of one shard of a random-access source (only those records are read).

  `limit` > 0 keeps the first `limit` examples of the whole source before sharding (so that every
  host's shards together are exactly those examples)."""
  n = min(limit, len(source)) if limit else len(source)
  start, end = shard_range(n, shard_index, shard_count)
  return list(source.__getitems__(list(range(start, end)))) if end > start else []


def _save_features(path, feats, info):
  """Rows of equal-length 1-D int arrays plus int scalars -> one .npz (concatenated arrays + row lengths)."""
  keys = list(feats[0]) if feats else []
  arrays = [k for k in keys if np.ndim(feats[0][k]) == 1]
  out = {"__info": np.array(json.dumps(info)), "__arrays": np.array(arrays, dtype=str),
         "__len": np.array([len(f[arrays[0]]) for f in feats] if arrays else [0] * len(feats), np.int64)}
  for k in keys:
    out[k] = np.concatenate([f[k] for f in feats]) if k in arrays else np.array([f[k] for f in feats])
  buf = io.BytesIO()
  np.savez(buf, **out)
  atomic.write_bytes(path, buf.getvalue())   # concurrent readers see no file or the complete one


def _load_features(path):
  with np.load(path) as z:
    cols = {k: z[k] for k in z.files}
  info, arrays = json.loads(str(cols.pop("__info"))), set(cols.pop("__arrays").tolist())
  ends = np.cumsum(cols.pop("__len"))
  starts = (ends - np.diff(ends, prepend=0)).tolist()
  ends = ends.tolist()
  rows = [{} for _ in ends]
  for k, v in cols.items():
    if k in arrays:
      for r, a, b in zip(rows, starts, ends):
        r[k] = v[a:b]
    else:
      for r, x in zip(rows, v.tolist()):
        r[k] = x
  return rows, info


def _cached(key, build: Callable, cache_dir):
  """Features from memory, else from the on-disk cache (keyed by a hash of `key`), else built and saved."""
  if key not in _FEATURE_CACHE:
    digest = hashlib.blake2b(repr((FEATURES_VERSION,) + key).encode(), digest_size=12).hexdigest()
    path = os.path.join(os.path.abspath(cache_dir or builders.DEFAULT_CACHE_DIR), "tokenized", f"{digest}.npz")
    if os.path.exists(path):
      _FEATURE_CACHE[key] = _load_features(path)
    else:
      _FEATURE_CACHE[key] = build()
      _save_features(path, *_FEATURE_CACHE[key])
    while len(_FEATURE_CACHE) > _FEATURE_CACHE_SIZE:
      _FEATURE_CACHE.popitem(last=False)
  _FEATURE_CACHE.move_to_end(key)
  return _FEATURE_CACHE[key]


# ---------------------------------------------------------------- features (tokenised once a split)

def _limit_key(limit) -> tuple:
  return (("limit", limit),) if limit else ()   # no entry without a limit: earlier keys stay valid


def token_cls_features(src, split, tokenizer, *, max_len, stride, label_all, owned_labels_only,
                       cache_dir=None, limit=0, shard_index=0, shard_count=1):
  """Windows of every sentence of a shard (see tokenize.windows_for_sentence) and stats/info.

  `src` is a sources.Source; `limit` keeps the split's first examples (read_shard)."""
  key = ("tok", src.dataset, split, src.name, tok_lib.tokenizer_fingerprint(tokenizer), max_len,
         stride, label_all, owned_labels_only, shard_index, shard_count) + _limit_key(limit)

  def build():
    examples = read_shard(src.split(split), shard_index, shard_count, limit)
    wp = tok_lib.WordPieces(tokenizer)
    wp.prime(T._text(w) for e in examples for w in e["tokens"])    # one batched call over distinct words
    prefix, suffix = tok_lib.special_wrap(tokenizer)
    budget = tok_lib.window_budget(max_len, prefix, suffix)
    tokenize = T.TokenizeWords(wp)
    align = T.AlignLabels(src.label_key, max_len=max_len, stride=stride, prefix=prefix,
                          suffix=suffix, label_all=label_all, owned_labels_only=owned_labels_only)
    windows, stats, longest = [], collections.Counter(), dict(pieces=0, words=0, example_id=-1)
    for e in examples:
      e = tokenize.map(e)
      stats["cut_words"] += sum(len(p) > budget for p in e["pieces"])
      wins = align.map(e)
      windows.extend(wins)
      stats["long_sentences"] += len(wins) > 1
      pieces = sum(len(p) for p in e["pieces"])
      if pieces > longest["pieces"]:
        longest = dict(pieces=pieces, words=len(e["pieces"]), example_id=int(e["idx"]))
    stats.update(unk_fallbacks=wp.unk_fallbacks, windows=len(windows), sentences=len(examples))
    info = dict(stats, num_words=[len(e["tokens"]) for e in examples],
                example_ids=[int(e["idx"]) for e in examples], label_names=list(src.label_names),
                longest_sentence=longest)
    return windows, info
  windows, info = _cached(key, build, cache_dir)
  T.log_counts(f"{src.dataset}/{split} tokenisation",
               {k: info[k] for k in ("unk_fallbacks", "cut_words")})
  _log_windowing(f"{src.dataset}/{split}", info, max_len, stride)
  return windows, info


def _log_windowing(name, info, max_len, stride) -> None:
  """Says how many sentences needed several windows, and how long the longest sentence is."""
  longest = info["longest_sentence"]
  logging.info("%s: %d of %d sentences exceed one window of max_len=%d and are split into "
               "overlapping windows (stride %d pieces; each word is predicted once); the longest, "
               "example %d, has %d words, %d word pieces", name, info["long_sentences"],
               info["sentences"], max_len, stride, longest["example_id"], longest["words"],
               longest["pieces"])


def _encode_texts(tokenizer, examples):
  """input_ids and (sentence pairs only) token_type_ids of every example, in one batched call."""
  texts = [T._text(e["sentence"]) for e in examples]
  if not (examples and "sentence_b" in examples[0]):
    return tokenizer(texts, verbose=False)["input_ids"], None
  enc = tokenizer(texts, [T._text(e["sentence_b"]) for e in examples], verbose=False)
  return enc["input_ids"], enc.get("token_type_ids")


def seq_cls_features(src, split, tokenizer, *, max_len, cache_dir=None, limit=0, shard_index=0,
                     shard_count=1):
  """input_ids (with specials, truncated to max_len: counted and logged), label, example_id per
  example; sentence pairs add token_type_ids (0 for the first text, 1 for the second, as BERT)."""
  key = ("seq", src.dataset, split, src.name, tok_lib.tokenizer_fingerprint(tokenizer), max_len,
         shard_index, shard_count) + _limit_key(limit)

  def build():
    examples = read_shard(src.split(split), shard_index, shard_count, limit)
    ids, types = _encode_texts(tokenizer, examples)
    _, suffix = tok_lib.special_wrap(tokenizer)
    feats, truncated = [], 0
    for i, (e, x) in enumerate(zip(examples, ids)):
      t = types[i] if types is not None else None
      if len(x) > max_len:  # keep the closing special token so the model sees a well-formed sequence
        truncated += 1
        x = x[:max_len - len(suffix)] + suffix
        t = None if t is None else t[:max_len - len(suffix)] + t[len(t) - len(suffix):]
      f = dict(input_ids=np.asarray(x, np.int32), label=int(e["label"]), example_id=int(e["idx"]))
      if t is not None:
        f["token_type_ids"] = np.asarray(t, np.int32)
      feats.append(f)
    return feats, dict(sentences=len(feats), truncated=truncated,
                       example_ids=[f["example_id"] for f in feats],
                       label_names=list(src.label_names))
  feats, info = _cached(key, build, cache_dir)
  T.log_counts(f"{src.dataset}/{split} tokenisation (max_len={max_len})",
               {"truncated_sentences": info["truncated"]})
  return feats, info


def lm_documents(src, split, tokenizer, *, cache_dir=None, shard_index=0, shard_count=1):
  """Tokenised documents in the tokenizer's specials ([CLS] .. [SEP]; GPT-2: .. <|endoftext|>)."""
  key = ("lm", src.dataset, split, src.name, tok_lib.tokenizer_fingerprint(tokenizer), shard_index,
         shard_count)

  def build():
    examples = read_shard(src.split(split), shard_index, shard_count)
    texts = [T._text(e["text"]) for e in examples]
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    prefix, suffix = tok_lib.special_wrap(tokenizer)
    if not prefix and not suffix and tokenizer.eos_token_id is not None:
      suffix = [tokenizer.eos_token_id]
    docs = [{"input_ids": np.asarray(prefix + x + suffix, np.int32)} for x in ids]
    return docs, dict(documents=len(docs), tokens=int(sum(len(d["input_ids"]) for d in docs)))
  docs, info = _cached(key, build, cache_dir)
  return [d["input_ids"] for d in docs], info


# ---------------------------------------------------------------- epoch plans

def train_plan(lengths, batch_size: int, seed: int, epoch: int, sort_chunk_batches: int = 50) -> list:
  """Batches of one training epoch, a pure function of (seed, epoch).

  Shuffle; drop the n % batch_size remainder (different examples each epoch); sort by length within
  chunks of `sort_chunk_batches` batches so a batch holds similar lengths (little padding); shuffle the
  batch order. sort_chunk_batches=0 disables the sorting.
  """
  lengths = np.asarray(lengths)
  rng = np.random.default_rng([seed, epoch])
  perm = rng.permutation(len(lengths))
  perm = perm[:len(perm) // batch_size * batch_size]
  chunk = max(1, sort_chunk_batches) * batch_size
  batches = []
  for c in range(0, len(perm), chunk):
    idx = perm[c:c + chunk]
    if sort_chunk_batches:
      idx = idx[np.argsort(lengths[idx], kind="stable")]
    batches += [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
  return [batches[i] for i in rng.permutation(len(batches))]


def eval_plan(lengths, batch_size: int) -> list:
  """One pass over every example, sorted by length (little padding); the last batch may be partial."""
  idx = np.argsort(np.asarray(lengths), kind="stable")
  return [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]


# ---------------------------------------------------------------- the iterator

class BatchIterator:
  """Iterator of numpy batch dicts with a JSON-serialisable state {pipeline, epoch, index}.

  Training iterators run forever (a new deterministic plan each epoch); evaluation iterators make one pass
  (iterating a finished one again starts a new pass).
  Batch `index` of `epoch` is a pure function of the pipeline's arguments, so restoring a state resumes on
  exactly the next batch.
  """

  def __init__(self, name: str, epoch_fn: Callable, train: bool, steps_per_epoch: Optional[int] = None,
               info: Optional[dict] = None, empty_spec: Optional[dict] = None):
    """Builds the iterator.

    Args:
      name: identifies the pipeline's arguments (checked by set_state).
      epoch_fn: epoch -> (batch specs, list of grain MapTransforms turning a spec into a batch).
      train: loop over epochs forever.
      steps_per_epoch: batches per epoch (default: all of the plan). Training: at most the plan's length.
        Evaluation: may exceed it; the extra batches are all dummy rows (so that every host of a
        multi-host evaluation runs the same number of steps).
      info: counts and metadata exposed as `.info`.
      empty_spec: the spec of an all-dummy batch.
    """
    self.name, self.train, self.info = name, train, dict(info or {})
    self._epoch_fn = epoch_fn
    self._epoch, self._index, self._ds_epoch, self._ds = 0, 0, None, None
    self._empty_spec = empty_spec
    specs, chain = epoch_fn(0)
    if steps_per_epoch is not None and steps_per_epoch > len(specs) and (train or empty_spec is None):
      raise ValueError(f"{name}: steps_per_epoch={steps_per_epoch} but this shard has only {len(specs)} batches")
    self._steps = len(specs) if steps_per_epoch is None else steps_per_epoch
    if self._steps == 0:
      raise ValueError(f"{name}: no batches (fewer examples than the batch size?)")
    self._build(0, specs, chain)

  def __len__(self):
    return self._steps

  def __iter__(self):
    if not self.train and self._index >= self._steps:
      self.reset()  # a finished evaluation pass starts over, so `for batch in it` works every eval round
    return self

  def _build(self, epoch, specs, chain):
    """grain MapDataset of one epoch: batch specs (with their global step) mapped through the chain."""
    specs = list(specs[:self._steps]) + [self._empty_spec] * (self._steps - len(specs))
    specs = [dict(s, step=epoch * self._steps + i) for i, s in enumerate(specs)]
    ds = grain.MapDataset.source(specs)
    for t in chain:
      ds = ds.map(t)
    self._ds, self._ds_epoch = ds, epoch

  def _dataset(self, epoch):
    if self._ds_epoch != epoch:
      self._build(epoch, *self._epoch_fn(epoch))
    return self._ds

  def __next__(self) -> dict:
    if self._index >= self._steps:
      if not self.train:
        raise StopIteration
      self._epoch, self._index = self._epoch + 1, 0
    batch = self._dataset(self._epoch)[self._index]
    self._index += 1
    return batch

  def get_state(self) -> dict:
    """JSON-serialisable position: the next batch is `index` of `epoch`."""
    return {"pipeline": self.name, "epoch": self._epoch, "index": self._index}

  def set_state(self, state: dict) -> None:
    """Restores a position saved by get_state (of an iterator built with the same arguments)."""
    if state.get("pipeline") != self.name:
      raise ValueError(f"iterator state is for pipeline {state.get('pipeline')!r}, not {self.name!r}")
    self._epoch, self._index = int(state["epoch"]), int(state["index"])

  def reset(self) -> None:
    """Back to the first batch of epoch 0."""
    self._epoch, self._index = 0, 0


def padding_stats(iterator: BatchIterator, num_batches: Optional[int] = None) -> dict:
  """Token economy of the first `num_batches` (default: one epoch / the pass); the iterator's state is kept.

  Returns:
    dict batches, total_tokens (B*T summed), real_tokens (input_mask sum), fill_fraction = real/total,
    padding_fraction = 1 - fill_fraction (dummy rows count as padding).
  """
  state = iterator.get_state()
  iterator.reset()
  n = len(iterator) if num_batches is None else min(num_batches, len(iterator))
  real = total = 0
  for _ in range(n):
    mask = next(iterator)["input_mask"]
    real += int(mask.sum())
    total += mask.size
  iterator.set_state(state)
  fill = real / max(total, 1)
  return dict(batches=n, total_tokens=total, real_tokens=real, fill_fraction=fill, padding_fraction=1 - fill)


# ---------------------------------------------------------------- pipelines per task

def _pipeline_name(dataset, split, kind, tokenizer, **kw):
  args = ",".join(f"{k}={v}" for k, v in sorted(kw.items()))
  return f"{dataset}/{split}/{kind}/tok={tok_lib.tokenizer_fingerprint(tokenizer)}/{args}"


def first_examples(feats, info, max_examples):
  """Keeps the features of the first `max_examples` examples of a shard (0 = all); info follows."""
  if not max_examples or max_examples >= len(info["example_ids"]):
    return feats, info
  keep = set(info["example_ids"][:max_examples])
  info = dict(info, example_ids=info["example_ids"][:max_examples])
  if "num_words" in info:
    info["num_words"] = info["num_words"][:max_examples]
  logging.info("using the first %d examples of the split (max_examples)", max_examples)
  return [f for f in feats if f["example_id"] in keep], info


def _fine_tuning_iterator(name, feats, info, *, train, batch_size, max_len, seed, buckets, sort_chunk_batches,
                          steps_per_epoch, pad_values, scalar_fields, bfloat16_keys):
  lengths = np.array([len(f["input_ids"]) for f in feats])
  tail = [T.PadToBucket(batch_size, buckets, pad_values, scalar_fields), T.CastDtypes(bfloat16_keys)]
  fixed = None if train else eval_plan(lengths, batch_size)

  def epoch_fn(epoch):
    plan = train_plan(lengths, batch_size, seed, epoch, sort_chunk_batches) if train else fixed
    return [{"indices": b.tolist()} for b in plan], [T.Gather(feats)] + tail
  if train and len(lengths) % batch_size:
    logging.info("%s: %d examples per epoch left out to keep the batch size fixed (different ones each epoch)",
                 name, len(lengths) % batch_size)
  return BatchIterator(name, epoch_fn, train, steps_per_epoch, info, empty_spec={"indices": []})


def _check_packed_shards(shard_count, steps_per_epoch):
  if shard_count > 1 and steps_per_epoch is None:
    raise ValueError("data.pack_rows with several input shards needs data.steps_per_epoch: the "
                     "hosts' packed epochs can differ in length by a few batches")


def _packed_iterator(name, feats, info, *, rows, row_len, seed, steps_per_epoch, pad_values,
                     bfloat16_keys, slot_fields=None):
  """Training batches of `rows` packed rows (packing.train_pack_plan) of `row_len` tokens;
  `slot_fields`: per-example scalars in (rows, slots) arrays (T.PackRows), slots enough for a row
  of the shortest examples."""
  lengths = np.array([len(f["input_ids"]) for f in feats])
  slots = row_len // max(1, int(lengths.min())) if slot_fields and len(lengths) else 0
  tail = [T.PackRows(feats, rows, row_len, pad_values, dict(slot_fields or {}), slots),
          T.CastDtypes(bfloat16_keys)]

  plan = packing.train_pack_plan(lengths, rows, row_len, seed, 0)
  steps = steps_per_epoch or len(plan)   # every epoch this long (train_pack_plan's num_batches)
  if not steps:
    raise ValueError(f"{name}: fewer packed rows than data.pack_rows={rows}")

  def epoch_fn(epoch):   # epoch 0's plan is the one just made (the same cut to `steps`)
    p = plan[:steps] if epoch == 0 and len(plan) >= steps else packing.train_pack_plan(
        lengths, rows, row_len, seed, epoch, num_batches=steps)
    return [{"rows": b} for b in p], tail
  packed = [i for b in plan[:steps] for r in b for i in r]
  fill = lengths[packed].sum() / (min(steps, len(plan)) * rows * row_len)
  logging.info("%s: %d examples packed into %d batches of %d x %d tokens (%.1f%% padding); %d "
               "left out of epoch 0 (the remainder rows; different ones each epoch)", name,
               len(packed), steps, rows, row_len, 100 * (1 - fill), len(lengths) - len(packed))
  info = dict(info, examples_per_batch=len(packed) / min(steps, len(plan)))   # for examples/s
  return BatchIterator(name, epoch_fn, True, steps, info, empty_spec={"rows": []})


def _buckets(max_len, buckets, shard_count, train):
  del train
  if buckets is None and shard_count > 1:
    # Hosts must feed equal shapes to one jit step; per-host length buckets could differ.
    logging.info("shard_count=%d: batches use the single length max_len=%d", shard_count, max_len)
    return [max_len]
  return T.bucket_lengths(max_len, buckets)


def _name_kw(src, limit) -> dict:
  """Pipeline-name entries for own files (their content hash) and a split limit; none otherwise, so
  iterator states saved by earlier versions stay valid."""
  kw = {"src": src.name} if src.own else {}
  return dict(kw, limit=limit) if limit else kw


def token_cls_batches(dataset, split, tokenizer, *, batch_size, max_len, seed=0, train=False,
                      shard_index=0, shard_count=1, data_dir=None, cache_dir=None, label_names=None,
                      buckets=None, stride=None, label_all_subwords=False, sort_chunk_batches=50,
                      steps_per_epoch=None, bfloat16_keys=(), max_examples=0, limit=0, pack_rows=0,
                      **options):
  """Token-classification batches (conll2003, brown_pos, conll:<path>); see make_batches.

  pack_rows > 0 (training only): batches of `pack_rows` rows of max_len tokens, the windows laid end
  to end in each row (packing.train_pack_plan; segment and position ids keep them apart):
  ~1% padding and one batch shape, where length buckets of 16 leave ~29% padding and compile one
  step per bucket. Evaluation batches are unchanged."""
  src = sources.get(dataset, data_dir, cache_dir, label_names, **options)
  stride = stride or max(1, (max_len - 2) // 2)
  feats, info = token_cls_features(src, split, tokenizer, max_len=max_len, stride=stride,
                                   label_all=label_all_subwords, owned_labels_only=not train,
                                   cache_dir=cache_dir, limit=limit, shard_index=shard_index,
                                   shard_count=shard_count)
  feats, info = first_examples(feats, info, max_examples)
  name = _pipeline_name(src.dataset, split, "token_cls", tokenizer, b=batch_size, L=max_len,
                        seed=seed, train=train, shard=f"{shard_index}of{shard_count}",
                        stride=stride,
                        all=label_all_subwords, buckets=buckets, sort=sort_chunk_batches,
                        spe=steps_per_epoch, n=max_examples, **_name_kw(src, limit))
  pad = dict(input_ids=tokenizer.pad_token_id, token_type_ids=0, labels=-1)
  if not train:
    pad.update(word_ids=-1, predict_mask=0)
  if train and pack_rows:
    _check_packed_shards(shard_count, steps_per_epoch)
    return _packed_iterator(name + f",pack={pack_rows}", feats, info, rows=pack_rows,
                            row_len=max_len, seed=seed, steps_per_epoch=steps_per_epoch,
                            pad_values=pad, bfloat16_keys=bfloat16_keys)
  return _fine_tuning_iterator(name, feats, info, train=train, batch_size=batch_size,
                               max_len=max_len, seed=seed,
                               buckets=_buckets(max_len, buckets, shard_count, train),
                               sort_chunk_batches=sort_chunk_batches,
                               steps_per_epoch=steps_per_epoch, pad_values=pad,
                               scalar_fields={"example_id": "example_ids"},
                               bfloat16_keys=bfloat16_keys)


def seq_cls_batches(dataset, split, tokenizer, *, batch_size, max_len, seed=0, train=False,
                    shard_index=0, shard_count=1, data_dir=None, cache_dir=None, label_names=None,
                    buckets=None, sort_chunk_batches=50, steps_per_epoch=None, bfloat16_keys=(),
                    max_examples=0, limit=0, pack_rows=0, **options):
  """Sequence-classification batches (sst2, tsv:/csv:/jsonl:<path>); see make_batches.

  pack_rows > 0 (training only): as token_cls_batches', with label (rows, slots) and
  pool_positions (rows, slots) (each example's [CLS]; -1 labels on empty slots) for a BERT
  pooler per example."""
  src = sources.get(dataset, data_dir, cache_dir, label_names, **options)
  feats, info = seq_cls_features(src, split, tokenizer, max_len=max_len, cache_dir=cache_dir,
                                 limit=limit, shard_index=shard_index, shard_count=shard_count)
  feats, info = first_examples(feats, info, max_examples)
  name = _pipeline_name(src.dataset, split, "seq_cls", tokenizer, b=batch_size, L=max_len,
                        seed=seed, train=train, shard=f"{shard_index}of{shard_count}",
                        buckets=buckets, sort=sort_chunk_batches, spe=steps_per_epoch,
                        n=max_examples, **_name_kw(src, limit))
  if train and pack_rows:
    _check_packed_shards(shard_count, steps_per_epoch)
    return _packed_iterator(name + f",pack={pack_rows}", feats, info, rows=pack_rows,
                            row_len=max_len, seed=seed, steps_per_epoch=steps_per_epoch,
                            pad_values=dict(input_ids=tokenizer.pad_token_id, token_type_ids=0),
                            bfloat16_keys=bfloat16_keys, slot_fields={"label": "label"})
  return _fine_tuning_iterator(name, feats, info, train=train, batch_size=batch_size,
                               max_len=max_len, seed=seed,
                               buckets=_buckets(max_len, buckets, shard_count, train),
                               sort_chunk_batches=sort_chunk_batches,
                               steps_per_epoch=steps_per_epoch,
                               pad_values=dict(input_ids=tokenizer.pad_token_id, token_type_ids=0),
                               scalar_fields={"label": "label", "example_id": "example_ids"},
                               bfloat16_keys=bfloat16_keys)


# The label formats of packed LM rows, by objective: the transform that turns packed rows into
# inputs + labels (see the module docstring of lib/data for the batch specs).
LM_LABELS = {
    "mlm": lambda tokenizer, seed, rate, whole_word: T.MaskTokens(tokenizer, seed, rate=rate,
                                                                  whole_word=whole_word),
    "clm": lambda tokenizer, seed, rate, whole_word: T.NextTokenLabels(),
    "none": lambda tokenizer, seed, rate, whole_word: T.NoLabels(),     # inputs only
}


def lm_batches(dataset, split, tokenizer, *, batch_size, max_len, seed=0, train=False, shard_index=0,
               shard_count=1, data_dir=None, cache_dir=None, objective=None, mlm_rate=0.15,
               whole_word_masking=False, steps_per_epoch=None, bfloat16_keys=(), **options):
  """Packed LM batches (text:<corpus or path>): rows of max_len tokens, documents shuffled per
  epoch; see make_batches."""
  src = sources.get(dataset, data_dir, cache_dir, None, **options)
  objective = objective or ("mlm" if tokenizer.mask_token_id is not None else "clm")
  if objective not in LM_LABELS:
    raise ValueError(f"objective must be one of {sorted(LM_LABELS)}, got {objective!r}")
  docs, info = lm_documents(src, split, tokenizer, cache_dir=cache_dir, shard_index=shard_index,
                            shard_count=shard_count)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  last = LM_LABELS[objective](tokenizer, seed + 1000003 * shard_index, mlm_rate,
                              whole_word_masking)
  fixed = None if train else packing.pack_stream(docs, max_len, pad_id)

  def epoch_fn(epoch):
    if train:
      order = np.random.default_rng([seed, epoch]).permutation(len(docs))
      packed = packing.pack_stream([docs[i] for i in order], max_len, pad_id)
      n = len(packed["input_ids"]) // batch_size * batch_size
    else:
      packed, n = fixed, len(fixed["input_ids"])
    specs = [{"rows": (s, min(s + batch_size, n))} for s in range(0, n, batch_size)]
    return specs, [T.GatherRows(packed, batch_size, pad_id), last, T.CastDtypes(bfloat16_keys)]
  name = _pipeline_name(src.dataset, split, objective, tokenizer, b=batch_size, L=max_len,
                        seed=seed, train=train, shard=f"{shard_index}of{shard_count}",
                        rate=mlm_rate,
                        wwm=whole_word_masking, spe=steps_per_epoch, **_name_kw(src, 0))
  return BatchIterator(name, epoch_fn, train, steps_per_epoch, dict(info, objective=objective),
                       empty_spec={"rows": (0, 0)})


_BATCHES = {"token_cls": token_cls_batches, "seq_cls": seq_cls_batches, "lm": lm_batches}


def make_batches(dataset: str, split: str, tokenizer, *, batch_size: int, max_len: int,
                 seed: int = 0, train: bool = False, shard_index: int = 0, shard_count: int = 1,
                 **kwargs) -> BatchIterator:
  """The batch iterator of a dataset split (see the module docstring of lib.data for the batch specs).

  Args:
    dataset: a named dataset: conll2003 / brown_pos (token classification), sst2 (classification),
      text:<corpus> (packed LM); or own files (lib.data.own): conll:<folder|file> (tagging),
      tsv:/csv:/jsonl:<folder|file> (classification, single texts or pairs), text:<file|folder>.
    split: train / validation / test.
    tokenizer: a transformers PreTrainedTokenizerFast (BERT WordPiece or GPT-2 BPE).
    batch_size: rows per batch (fixed; evaluation pads the last batch with dummy rows).
    max_len: longest sequence (token tasks: window length; LM: row length).
    seed: shuffling (and MLM masking) seed.
    train: loop over epochs forever with an epoch-seeded reshuffle; else one ordered pass.
    shard_index, shard_count: this process's contiguous shard of the split (e.g.
      jax.process_index/count).
    **kwargs: data_dir, cache_dir, and per task: label_names, buckets, stride, label_all_subwords,
      sort_chunk_batches, max_examples (the first N examples of the shard), limit (the first N
      examples of the split, before sharding), pack_rows (training rows of packed windows)
      (token_cls); label_names, buckets,
      sort_chunk_batches, max_examples, limit, pack_rows (seq_cls); objective ('mlm'|'clm'), mlm_rate,
      whole_word_masking (LM); steps_per_epoch, bfloat16_keys (all); own files: train_file,
      validation_file, test_file (all), word_column, tag_column, tag_scheme (conll:),
      text_columns, label_column (tsv:/csv:/jsonl:) (see lib.data.own). With shard_count > 1 and
      no explicit buckets every batch is padded to max_len (equal shapes on every host);
      multi-host runs pass the same steps_per_epoch to every host (evaluation pads with
      all-dummy batches).

  Returns:
    a BatchIterator (len = batches per epoch; get_state / set_state).
  """
  src_kw = {k: kwargs.pop(k) for k in ("data_dir", "label_names", *own.OPTION_DEFAULTS)
            if k in kwargs}
  src = sources.get(dataset, cache_dir=kwargs.get("cache_dir"), **src_kw)
  return _BATCHES[src.task](src, split, tokenizer, batch_size=batch_size, max_len=max_len,
                            seed=seed, train=train, shard_index=shard_index,
                            shard_count=shard_count, **kwargs)


_COMMON_KEYS = {"dataset", "batch_size", "eval_batch_size", "max_len", "seed", "data_dir",
                "cache_dir", "steps_per_epoch", "bfloat16_keys"}
_TASK_KEYS = {"token_cls": {"label_names", "buckets", "stride", "label_all_subwords",
                            "sort_chunk_batches", "max_examples", "max_eval_examples", "pack_rows"},
              "seq_cls": {"label_names", "buckets", "sort_chunk_batches", "max_examples",
                          "max_eval_examples", "pack_rows"},
              "lm": {"objective", "mlm_rate", "whole_word_masking"}}
# Config keys of own files, per task; their make_batches keywords; their defaults (a key at its
# default is accepted for every dataset, so one config block serves named and own data).
_OWN_KEYS = {"token_cls": {"train", "validation", "test", "word_column", "tag_column",
                           "tag_scheme"},
             "seq_cls": {"train", "validation", "test", "text_columns", "label_column"},
             "lm": {"train", "validation", "test"}}
_RENAMED = {"train": "train_file", "validation": "validation_file", "test": "test_file"}
CONFIG_DEFAULTS = dict(train="", validation="", test="", word_column=0, tag_column=-1,
                       tag_scheme="auto", text_columns="", label_column="label",
                       max_eval_examples=0)


def config_kwargs(data_cfg, batch_divisor: int = 1) -> dict:
  """A script config's `data` block as `from_config` keywords.

  `dir` (the shared data folder) becomes data_dir, an empty cache_dir means the default, and the
  global batch sizes are divided among `batch_divisor` processes (each loads its own rows).

  Raises:
    ValueError: a batch size not divisible by the number of processes.
  """
  d = dict(data_cfg)
  if "dir" in d:
    d["data_dir"] = d.pop("dir")
  if not d.get("cache_dir"):
    d.pop("cache_dir", None)
  for key in ("batch_size", "eval_batch_size"):
    if key in d and d[key] % batch_divisor:
      raise ValueError(f"data.{key}={d[key]} is not divisible by the {batch_divisor} processes")
    if key in d:
      d[key] //= batch_divisor
  return d


def _is_default(key, value) -> bool:
  if key not in CONFIG_DEFAULTS:
    return False
  default = CONFIG_DEFAULTS[key]
  return value == default or (default == "" and isinstance(value, (tuple, list)) and not value)


def _checked(data_cfg) -> dict:
  """A data block without None values and own-files keys at their defaults, its keys checked
  against the dataset's task, own-file keys renamed to make_batches keywords.

  Raises:
    ValueError: an unknown dataset, or a key that is not valid for it (listing the valid ones).
  """
  cfg = {k: v for k, v in dict(data_cfg).items() if v is not None and not _is_default(k, v)}
  dataset = cfg.get("dataset", "")
  task = sources.task_of(dataset)
  valid = _COMMON_KEYS | _TASK_KEYS[task] | (_OWN_KEYS[task] if own.parse(dataset) else set())
  unknown = sorted(set(cfg) - valid)
  if unknown:
    raise ValueError(f"data config: unknown keys {unknown} for dataset {dataset!r}; "
                     f"valid: {sorted(valid)}")
  return {_RENAMED.get(k, k): v for k, v in cfg.items()}


def from_config(data_cfg, tokenizer, split: str, *, train: bool, shard_index: int = 0,
                shard_count: int = 1) -> BatchIterator:
  """make_batches from a data sub-config (ConfigDict or dict); None values mean 'use the default'.

  Keys: dataset, batch_size, max_len, seed, optional eval_batch_size (used when not training),
  max_eval_examples (> 0: the first N examples of a validation/test split, as read_gold scores
  them), own files' train/validation/test paths and reading options (see CONFIG_DEFAULTS), and any
  make_batches keyword valid for the dataset's task.

  Raises:
    ValueError: a key that is not valid for the dataset, naming it and listing the valid ones.
  """
  cfg = _checked(data_cfg)
  eval_bs = cfg.pop("eval_batch_size", None)
  if not train and eval_bs:
    cfg["batch_size"] = eval_bs
  limit = cfg.pop("max_eval_examples", 0)
  if split != "train" and limit:
    cfg["limit"] = limit
  if "buckets" in cfg:
    cfg["buckets"] = list(cfg["buckets"])
  return make_batches(cfg.pop("dataset"), split, tokenizer, train=train, shard_index=shard_index,
                      shard_count=shard_count, **cfg)


def source_of(data_kwargs) -> sources.Source:
  """The sources.Source of a data block (config_kwargs' result or the config's own `data`)."""
  d = dict(data_kwargs)
  d.setdefault("data_dir", d.pop("dir", None))
  opts = {_RENAMED.get(k, k): d[k] for k in CONFIG_DEFAULTS
          if k != "max_eval_examples" and d.get(k) is not None and not _is_default(k, d[k])}
  return sources.get(d["dataset"], d.get("data_dir") or None, d.get("cache_dir") or None,
                     d.get("label_names") or None, **opts)


def read_gold(data_kwargs, split: str) -> tuple:
  """(inputs, gold) to score a split against, for named and own datasets alike.

  Token classification: word lists and tag-name lists; sequence classification: one-line texts
  (pairs joined by own.PAIR_SEPARATOR) and label names (see sources.gold). With
  max_eval_examples > 0, the first N examples of validation/test: the ones from_config evaluates.

  Args:
    data_kwargs: config_kwargs' result or the config's `data` block (batch keys are ignored).
    split: train / validation / test.
  """
  limit = int(dict(data_kwargs).get("max_eval_examples") or 0) if split != "train" else 0
  return sources.gold(source_of(data_kwargs), split, limit)
