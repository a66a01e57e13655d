"""A Hugging Face PyTorch pipeline behind the same HTTP API (the load test's baseline).

`TorchEngine` offers what lib/serving/app.py's Server needs of an engine (endpoints, encode,
submit, answers, a batcher-like queue) around `transformers.pipeline`: one worker thread runs the
pipeline on each request's texts as they come (no batching across requests), as a plain FastAPI +
pipeline service does. Endpoints: /v1/classify (text-classification) and /v1/ner
(token-classification, entities grouped with aggregation_strategy='simple').
"""

import concurrent.futures
import threading

_TASKS = {"seq_cls": ("classify", "text-classification"),
          "token_cls": ("ner", "token-classification")}


class _Queue:
  """The batcher-like part: one worker thread, a depth gauge, batch/unit counters, stop."""

  def __init__(self, run):
    self.run, self.on_batch = run, None
    self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="torch")
    self.batches = self.units = 0
    self._waiting = 0
    self._lock = threading.Lock()

  @property
  def depth(self) -> int:
    return self._waiting

  def submit(self, units):
    with self._lock:
      self._waiting += len(units)
    return self.pool.submit(self._call, units)

  def _call(self, units):
    with self._lock:
      self._waiting -= len(units)
    out = self.run(units)
    self.batches, self.units = self.batches + 1, self.units + len(units)
    if self.on_batch is not None:
      self.on_batch(len(units), (len(units), 0))
    return out

  def stop(self, drain: bool = True) -> None:
    self.pool.shutdown(wait=drain, cancel_futures=not drain)


class TorchEngine:
  """A transformers pipeline of a Hugging Face directory (research/convert.py --to=hf).

  Args:
    hf_dir: the model directory (config.json with id2label, weights, tokenizer files).
    head: 'seq_cls' or 'token_cls' (what the directory's model is).
    threads: torch intra-op threads (0 = torch's default).
  """

  def __init__(self, hf_dir: str, head: str, threads: int = 0):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    if head not in _TASKS:
      raise ValueError(f"head {head!r}: the PyTorch baseline serves {sorted(_TASKS)}")
    if threads:
      torch.set_num_threads(threads)
    endpoint, task = _TASKS[head]
    kwargs = dict(top_k=None) if endpoint == "classify" else dict(aggregation_strategy="simple")
    self.pipe = transformers.pipeline(task, model=hf_dir, tokenizer=hf_dir, device=-1, **kwargs)
    self.endpoints = (endpoint,)
    self.model = type("Model", (), {"head": head})()
    self.batcher = _Queue(self.pipe)
    self.ready = False

  def warm_up(self) -> None:
    self.pipe(["warm up"])
    self.ready = True

  def compiles_since_ready(self) -> int:
    return 0          # eager PyTorch: nothing is compiled

  def submit(self, units):
    return self.batcher.submit(list(units))

  def encode(self, texts, field: str = "texts") -> list:
    del field
    return list(texts)

  def classify_answer(self, out) -> dict:
    probs = {d["label"]: float(d["score"]) for d in out}
    return dict(label=max(probs, key=probs.get), probabilities=probs)

  def ner_units(self, text: str) -> tuple:
    """(no words, one window): the pipeline tokenizes and aggregates the whole text itself."""
    return None, [dict(input_ids=text)]

  def ner_answer(self, text, words, wins, outputs) -> dict:
    del text, words, wins
    return dict(entities=[dict(type=e["entity_group"], start=int(e["start"]), end=int(e["end"]),
                               text=e["word"], score=float(e["score"])) for e in outputs[0]])
