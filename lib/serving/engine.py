"""What a served model computes: texts -> batcher units -> padded, bucketed model calls -> answers.

One forward function per model, jitted once and compiled for every (rows, length) bucket at
warm-up; it returns the head's logits and the mean-pooled, L2-normalised last hidden state (the
sentence-transformers pooling of all-MiniLM-L6-v2), so /v1/ner, /v1/classify and /v1/embed share
one batcher and one set of compilations. Long NER texts are windowed exactly as fine-tuning
evaluates them (lib.data.tokenize.windows_for_sentence: overlapping windows, each word predicted
once, from the window where it has most context); nothing is truncated: a classify/embed text
longer than the longest bucket is refused (TooLongError).
"""

import functools
import re
import threading

import jax
import jax.numpy as jnp
import numpy as np

from lib import export, metrics, model_io, sampling
from lib.data import tokenize as tok_lib
from lib.serving import batcher as B

# Endpoints each head serves (BERT encoders also embed; GPT-2 LMs generate).
ENDPOINTS = {"token_cls": ("ner", "embed"), "seq_cls": ("classify", "embed"),
             None: ("embed",), "mlm": ("embed",), "lm": ("generate",)}
WORD = re.compile(r"\w+|[^\w\s]")      # words and single punctuation marks, as CoNLL tokenises
_COMPILES = [0]
_LISTENING = threading.Lock()


def _on_event(event, *args, **kwargs):
  del args, kwargs
  if event == "/jax/core/compile/backend_compile_duration":
    _COMPILES[0] += 1


def compilations() -> int:
  """XLA backend compilations in this process since the first engine was made."""
  return _COMPILES[0]


def _listen_once():
  with _LISTENING:
    if not getattr(_listen_once, "done", False):
      jax.monitoring.register_event_duration_secs_listener(_on_event)
      _listen_once.done = True


class TooLongError(ValueError):
  """A text has more tokens than the longest served sequence (it is refused, never truncated)."""


def split_words(text: str) -> list:
  """(word, start, end) character spans of the words and punctuation marks of `text`."""
  return [(m.group(), m.start(), m.end()) for m in WORD.finditer(text)]


def _forward(module, params, ids, mask):
  # The exported computation (lib/export.py): what /v1/* serve is what an export file runs.
  return export.predict_outputs(module, params, ids, mask)


def window_settings(source: str, args) -> tuple:
  """(window length, stride) for NER: what the run was fine-tuned with (model.json 'data'),
  else 128 (capped at the model's max_len) and half a window, the data pipeline's default."""
  data = {}
  try:
    data = model_io.read_model_json(model_io.split_source(source)[0]).get("data") or {}
  except (OSError, ValueError):
    pass
  max_len = int(data.get("max_len") or min(128, args.max_len))
  stride = int(data.get("stride") or max(1, (max_len - 2) // 2))
  return max_len, stride


class Engine:
  """A loaded model, its jitted forward, the batcher in front of it and the per-endpoint glue.

  Args:
    model: from model_io.load_for_inference.
    limits: batching limits; length buckets above the model's max_len are dropped and the NER
      window length is added.
    window: (length, stride) of NER windows (default: `window_settings`).
  """

  def __init__(self, model, limits: B.BatchLimits, window=None):
    _listen_once()
    self.model, self.tokenizer = model, model.tokenizer
    self.endpoints = ENDPOINTS.get(model.head, ("embed",) if model.args.arch == "bert" else ())
    self.window = window or window_settings(model.source, model.args)
    buckets = {b for b in limits.length_buckets if b <= model.args.max_len}
    if "ner" in self.endpoints:
      buckets.add(self.window[0])
    limits.length_buckets = tuple(sorted(buckets))
    self.limits = limits
    self.prefix, self.suffix = tok_lib.special_wrap(self.tokenizer)
    self.pad_id = self.tokenizer.pad_token_id or 0
    self.words = tok_lib.WordPieces(self.tokenizer)
    self.params = jax.device_put(model.params)
    self.forward = jax.jit(functools.partial(_forward, model.module))
    self.sample = jax.jit(functools.partial(sample_batch, model.module))
    self.batcher = B.Batcher(self._run_batch, limits)
    self.ready = False
    self.compiles_at_ready = None

  # -------------------------------------------------------------------------- model calls

  def warm_up(self) -> None:
    """Compiles every (rows, length) bucket shape, then starts the batcher."""
    for rows, length in self.limits.shapes():
      if self.endpoints == ("generate",):
        batch = generate_batch([], (rows, length), self.pad_id)
        jax.block_until_ready(self.sample(self.params, batch))
      else:
        ids = np.full((rows, length), self.pad_id, np.int32)
        jax.block_until_ready(self.forward(self.params, ids, np.ones_like(ids)))
    row_key(0, 0)                     # compiles the host-side key derivation too
    self.batcher.start()
    self.compiles_at_ready = compilations()
    self.ready = True

  def compiles_since_ready(self) -> int:
    return 0 if self.compiles_at_ready is None else compilations() - self.compiles_at_ready

  def _run_batch(self, payloads, shape):
    if self.endpoints == ("generate",):
      return self._run_generate(payloads, shape)
    rows, length = shape
    ids = np.full((rows, length), self.pad_id, np.int32)
    mask = np.zeros((rows, length), np.int32)
    for i, p in enumerate(payloads):
      ids[i, :len(p)] = p
      mask[i, :len(p)] = 1
    out = {k: np.asarray(v) for k, v in self.forward(self.params, ids, mask).items()}
    return [{k: v[i] for k, v in out.items()} for i in range(len(payloads))]

  def submit(self, units):
    """Queues unit id arrays or generate units (one request); a future of their outputs."""
    return self.batcher.submit(units, [u["length"] if isinstance(u, dict) else len(u)
                                       for u in units])

  # -------------------------------------------------------------------------- per endpoint

  def encode(self, texts, field: str = "texts") -> list:
    """[CLS] text [SEP] ids of each text (classify, embed).

    Raises:
      TooLongError: naming the text (field[i]) and its token count.
    """
    ids = self.tokenizer(list(texts), verbose=False)["input_ids"]
    longest = self.limits.length_buckets[-1]
    for i, x in enumerate(ids):
      if len(x) > longest:
        raise TooLongError(f"{field}[{i}]: {len(x)} tokens; this server takes at most {longest} "
                           "per text (texts are never truncated)")
    return [np.asarray(x, np.int32) for x in ids]

  def ner_units(self, text: str) -> tuple:
    """(words with spans, windows) of one text, windowed as fine-tuning evaluates."""
    words = split_words(text)
    if not words:
      return words, []
    if len(self.words.cache) > 200_000:      # bound the word-piece cache of a long-lived server
      self.words.cache.clear()
    pieces = self.words([w for w, _, _ in words])
    max_len, stride = self.window
    wins = tok_lib.windows_for_sentence(pieces, None, max_len=max_len, stride=stride,
                                        prefix=self.prefix, suffix=self.suffix, label_all=False,
                                        owned_labels_only=True)
    return words, wins

  def ner_answer(self, text, words, wins, outputs) -> dict:
    """Word tags (one per word, from its owning window) and entities with character offsets."""
    names = self.model.label_names
    tags, scores = [None] * len(words), [0.0] * len(words)
    for win, out in zip(wins, outputs):
      for pos in np.flatnonzero(win["predict_mask"] == 1):
        w = int(win["word_ids"][pos])
        probs = _softmax(out["logits"][pos])
        tags[w], scores[w] = names[int(np.argmax(probs))], float(probs.max())
    entities = []
    for typ, b, e in metrics.get_entities(tags):
      start, end = words[b][1], words[e][2]
      entities.append(dict(type=typ, start=start, end=end, text=text[start:end],
                           score=float(np.mean(scores[b:e + 1]))))
    return dict(entities=entities,
                words=[dict(word=w, start=s, end=t, tag=g) for (w, s, t), g in zip(words, tags)])

  def classify_answer(self, out) -> dict:
    probs = _softmax(out["logits"])
    names = self.model.label_names or [str(i) for i in range(len(probs))]
    return dict(label=names[int(np.argmax(probs))],
                probabilities={n: float(p) for n, p in zip(names, probs)})


  def generate_units(self, req) -> list:
    """One unit per prompt of a GenerateRequest: ids, sampling settings and the row's key
    (fold_in(key(seed), prompt index), as lib.sampling: a row's draw ignores its batch mates).

    Raises:
      TooLongError: prompt + max_tokens over the longest length bucket (naming prompts[i]).
      BadInputError: a prompt with no tokens.
    """
    longest = self.limits.length_buckets[-1]
    units = []
    for i, prompt in enumerate(req.prompts):
      ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
      if not ids:
        raise BadInputError(f"prompts[{i}]: no tokens; give at least one")
      if len(ids) + req.max_tokens > longest:
        raise TooLongError(f"prompts[{i}]: {len(ids)} prompt tokens + max_tokens "
                           f"{req.max_tokens} > {longest}, the longest sequence served")
      units.append(dict(input_ids=np.asarray(ids, np.int32), length=len(ids) + req.max_tokens,
                        max_new=req.max_tokens, temperature=req.temperature, top_k=req.top_k,
                        top_p=req.top_p, key=row_key(req.seed, i), step0=0))
    return units

  @staticmethod
  def next_chunk(unit: dict, new: list, chunk: int) -> dict:
    """The unit continuing `unit` after its `new` generated ids, for at most `chunk` tokens: the
    prompt grows by `new` and draws start at step len(new), so that generating in chunks gives
    exactly the tokens of one call (a row's step-s key is fold_in(row key, s) either way)."""
    ids = np.concatenate([unit["input_ids"], np.asarray(new, np.int32)])
    steps = min(chunk, unit["max_new"] - len(new))
    return dict(unit, input_ids=ids, length=len(ids) + steps, max_new=steps, step0=len(new))

  def decode(self, ids) -> str:
    return self.tokenizer.decode(ids)

  def _run_generate(self, payloads, shape):
    batch = generate_batch(payloads, shape, self.pad_id)
    out = np.asarray(self.sample(self.params, batch))
    eos = self.tokenizer.eos_token_id
    return [[int(t) for t in sampling.continuations(out[i:i + 1], batch["prompt_len"][i:i + 1],
                                                    p["max_new"], eos)[0]]
            for i, p in enumerate(payloads)]     # fewer than max_new ids: it ended (eos)


class BadInputError(ValueError):
  """A request field the model cannot take (e.g. a prompt with no tokens)."""


def row_key(seed: int, index: int) -> np.ndarray:
  """The uint32 key data of prompt `index` of a request with `seed` (lib.sampling's rule)."""
  return np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(seed), index)),
                    np.uint32)


def generate_batch(payloads, shape, pad_id: int) -> dict:
  """The (rows, length) arrays `sample_batch` takes; rows past the payloads are inert (0 steps)."""
  rows, length = shape
  b = dict(input_ids=np.full((rows, length), pad_id, np.int32),
           prompt_len=np.ones(rows, np.int32), max_new=np.zeros(rows, np.int32),
           temperature=np.zeros(rows, np.float32), top_k=np.zeros(rows, np.int32),
           top_p=np.ones(rows, np.float32), key=np.zeros((rows, 2), np.uint32),
           step0=np.zeros(rows, np.int32))
  for i, p in enumerate(payloads):
    b["input_ids"][i, :len(p["input_ids"])] = p["input_ids"]
    b["prompt_len"][i] = len(p["input_ids"])
    for k in ("max_new", "temperature", "top_k", "top_p", "key", "step0"):
      b[k][i] = p[k]
  return b


def filter_rows(logits, top_k, top_p):
  """lib.sampling.filter_logits with per-row top_k (B,) and top_p (B,) as arrays (traced, so one
  compilation serves every setting); top_k keeps the logits >= the k-th largest (ties kept)."""
  neg = jnp.full_like(logits, -jnp.inf)
  desc = -jnp.sort(-logits, axis=-1)                                          # (B, V)
  kth = jnp.take_along_axis(desc, jnp.maximum(top_k - 1, 0)[:, None], axis=-1)
  logits = jnp.where((top_k[:, None] > 0) & (logits < kth), neg, logits)
  order = jnp.argsort(-logits, axis=-1)
  probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
  keep_sorted = ((jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]) | (top_p[:, None] >= 1)
  keep = jnp.put_along_axis(jnp.zeros(logits.shape, bool), order, keep_sorted, axis=-1,
                            inplace=False)
  return jnp.where(keep, logits, neg)


def sample_batch(module, params, batch):
  """(B, L) ids: each row's prompt continued by its own max_new tokens, greedy where its
  temperature is 0, else drawn from its tempered, top-k / top-p filtered distribution; step s of
  a row draws with fold_in(row key, step0 + s) (step0 > 0: a continued stream)."""
  ids, plen = batch["input_ids"], batch["prompt_len"]
  keys = jax.vmap(jax.random.wrap_key_data)(batch["key"])
  rows = jnp.arange(ids.shape[0])
  temp = batch["temperature"]

  def body(s, ids):
    out, _ = module.apply({"params": params}, input_ids=ids, deterministic=True)
    pos = jnp.minimum(plen - 1 + s, ids.shape[1] - 2)                         # (B,)
    logits = out["logits"][rows, pos].astype(jnp.float32)                     # (B, V)
    tempered = filter_rows(logits / jnp.where(temp > 0, temp, 1.0)[:, None], batch["top_k"],
                           batch["top_p"])
    step_keys = jax.vmap(lambda k, s0: jax.random.fold_in(k, s0 + s))(keys, batch["step0"])
    drawn = jax.vmap(jax.random.categorical)(step_keys, tempered)
    tok = jnp.where(temp > 0, drawn, jnp.argmax(logits, -1)).astype(jnp.int32)
    live = s < batch["max_new"]
    return ids.at[rows, pos + 1].set(jnp.where(live, tok, ids[rows, pos + 1]))
  return jax.lax.fori_loop(0, jnp.max(batch["max_new"]), body, ids)


def _softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)
