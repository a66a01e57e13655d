"""Tests of lib/serving: the batcher (order, limits, max wait, shutdown) and the HTTP server."""

import json
import os
import threading
import time

import pytest

from lib.serving import batcher as B


class Recorder:
  """run_batch that echoes its payloads (times 10) and records each batch's payloads and shape."""

  def __init__(self, delay=0.0, gate=None):
    self.batches, self.delay, self.gate = [], delay, gate

  def __call__(self, payloads, shape):
    if self.gate is not None:
      self.gate.wait(5)
    time.sleep(self.delay)
    self.batches.append((list(payloads), shape))
    return [p * 10 for p in payloads]


def test_bucket_and_row_buckets():
  assert [B.bucket(v, [16, 32]) for v in (1, 16, 17, 32)] == [16, 16, 32, 32]
  with pytest.raises(ValueError, match="exceeds the largest bucket 32"):
    B.bucket(33, [16, 32])
  assert B.powers_of_two(32) == [1, 2, 4, 8, 16, 32]
  assert B.powers_of_two(12) == [1, 2, 4, 8, 12]
  lim = B.BatchLimits(max_batch=8, max_tokens=64, length_buckets=(16, 32))
  assert lim.shapes() == [(1, 16), (1, 32), (2, 16), (2, 32), (4, 16)]


def _set_partitions(items):
  if not items:
    yield []
    return
  for rest in _set_partitions(items[1:]):
    for k in range(len(rest)):
      yield rest[:k] + [[items[0]] + rest[k]] + rest[k + 1:]
    yield [[items[0]]] + rest


def test_plan_calls_is_the_cheapest_split_of_a_batch():
  """Against brute force over every set partition: padded tokens + overhead per call."""
  import random  # pylint: disable=g-import-not-at-top

  def cost(calls, lengths, lim):
    shapes = [lim.padded_shape(len(c), max(lengths[i] for i in c)) for c in calls]
    return sum(r * t + lim.call_overhead_tokens for r, t in shapes)
  rng = random.Random(0)
  for _ in range(150):
    lengths = [rng.randrange(1, 129) for _ in range(rng.randrange(1, 7))]
    lim = B.BatchLimits(max_batch=8, length_buckets=(16, 32, 64, 128),
                        call_overhead_tokens=rng.choice([0, 16, 128, 10_000]))
    calls = B.plan_calls(lengths, lim)
    assert sorted(i for c in calls for i in c) == list(range(len(lengths)))
    best = min(cost(p, lengths, lim) for p in _set_partitions(list(range(len(lengths)))))
    assert cost(calls, lengths, lim) == best, (lengths, lim.call_overhead_tokens)
  lim = B.BatchLimits(max_batch=8, length_buckets=(16, 128), call_overhead_tokens=10)
  assert B.plan_calls([5, 100, 6, 120], lim) == [[0, 2], [1, 3]]   # 2x16 + 2x128 + 2x10 < 4x128
  lim.call_overhead_tokens = 10_000
  assert B.plan_calls([5, 100, 6, 120], lim) == [[0, 1, 2, 3]]


def test_a_batch_of_mixed_lengths_runs_as_calls_of_similar_length():
  gate = threading.Event()
  rec = Recorder(gate=gate)
  lim = B.BatchLimits(max_batch=8, max_wait_ms=0, length_buckets=(16, 128),
                      call_overhead_tokens=10)
  b = B.Batcher(rec, lim).start()
  b.submit([0], [1])
  time.sleep(0.05)
  f = b.submit([1, 2, 3, 4], [100, 5, 120, 6])
  gate.set()
  assert f.result(5) == [10, 20, 30, 40]          # answers in the request's order
  b.stop()
  assert rec.batches[1:] == [([2, 4], (2, 16)), ([1, 3], (2, 128))]


def test_answers_in_order_under_concurrency():
  rec = Recorder()
  b = B.Batcher(rec, B.BatchLimits(max_batch=4, max_wait_ms=2, length_buckets=(8,))).start()
  results, errors = {}, []

  def client(k):
    try:
      payloads = [k * 100 + i for i in range(1 + k % 5)]
      results[k] = (payloads, b.submit(payloads, [3] * len(payloads)).result(10))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)
  threads = [threading.Thread(target=client, args=(k,)) for k in range(40)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  b.stop()
  assert not errors
  for payloads, out in results.values():
    assert out == [p * 10 for p in payloads]
  assert all(len(p) <= 4 for p, _ in rec.batches)
  assert sum(len(p) for p, _ in rec.batches) == sum(1 + k % 5 for k in range(40))


def test_max_batch_and_fifo_when_queued_together():
  gate = threading.Event()
  rec = Recorder(gate=gate)
  b = B.Batcher(rec, B.BatchLimits(max_batch=4, max_wait_ms=0, length_buckets=(8,))).start()
  first = b.submit([0], [1])          # the worker holds this one at the gate
  time.sleep(0.05)
  futures = [b.submit([i], [1]) for i in range(1, 11)]
  gate.set()
  assert first.result(5) == [0]
  assert [f.result(5) for f in futures] == [[i * 10] for i in range(1, 11)]
  b.stop()
  assert [p for p, _ in rec.batches] == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
  assert [s for _, s in rec.batches] == [(1, 8), (4, 8), (4, 8), (2, 8)]


def test_max_tokens_limits_padded_batch():
  gate = threading.Event()
  rec = Recorder(gate=gate)
  lim = B.BatchLimits(max_batch=8, max_tokens=256, max_wait_ms=0, length_buckets=(16, 128))
  b = B.Batcher(rec, lim).start()
  b.submit([0], [1])
  time.sleep(0.05)
  f = b.submit(list(range(1, 6)), [100, 10, 10, 100, 10])
  gate.set()
  assert f.result(5) == [10, 20, 30, 40, 50]
  b.stop()
  # 2 rows x 128 = 256 fits; a third row rounds rows up to 4: 4 x 128 > 256.
  assert [p for p, _ in rec.batches] == [[0], [1, 2], [3, 4], [5]]
  assert all(s[0] * s[1] <= 256 for _, s in rec.batches)


def test_max_wait_is_honoured():
  rec = Recorder()
  b = B.Batcher(rec, B.BatchLimits(max_batch=8, max_wait_ms=200, length_buckets=(8,))).start()
  t0 = time.monotonic()
  assert b.submit([1], [1]).result(5) == [10]
  waited = time.monotonic() - t0
  assert 0.19 <= waited < 1.5, waited      # a lone request waits for company, then goes alone
  b.stop()
  b0 = B.Batcher(Recorder(), B.BatchLimits(max_batch=8, max_wait_ms=0, length_buckets=(8,)))
  b0.start()
  t0 = time.monotonic()
  assert b0.submit([1], [1]).result(5) == [10]
  assert time.monotonic() - t0 < 0.15
  b0.stop()


def test_no_wait_for_company_when_no_other_request_is_open():
  """With the caller's open-request count: a lone request goes at once; with another request
  open (not yet queued) the batch waits for it, up to max_wait."""
  open_requests = [1]
  rec = Recorder()
  b = B.Batcher(rec, B.BatchLimits(max_batch=8, max_wait_ms=300, length_buckets=(8,)),
                in_flight=lambda: open_requests[0]).start()
  t0 = time.monotonic()
  assert b.submit([1], [1]).result(5) == [10]
  assert time.monotonic() - t0 < 0.15                      # nobody else: no 300 ms wait
  open_requests[0] = 2
  t0 = time.monotonic()
  first = b.submit([2], [1])
  time.sleep(0.1)
  second = b.submit([3], [1])                              # the other open request arrives
  assert first.result(5) == [20] and second.result(5) == [30]
  assert 0.09 <= time.monotonic() - t0 < 0.29              # left when both were in, not at 300
  b.stop()
  assert [p for p, _ in rec.batches] == [[1], [2, 3]]


def test_queue_full_and_too_long_and_errors():
  gate = threading.Event()
  b = B.Batcher(Recorder(gate=gate), B.BatchLimits(max_batch=2, max_queue=3, max_wait_ms=0,
                                                   length_buckets=(8,))).start()
  b.submit([0], [1])
  time.sleep(0.05)
  b.submit([1, 2, 3], [1, 1, 1])
  with pytest.raises(B.QueueFullError, match="max_queue 3"):
    b.submit([4], [1])
  with pytest.raises(ValueError, match="largest length bucket 8"):
    b.submit([5], [9])
  gate.set()
  b.stop()

  def boom(payloads, shape):
    raise RuntimeError("model failed")
  bad = B.Batcher(boom, B.BatchLimits(length_buckets=(8,))).start()
  with pytest.raises(RuntimeError, match="model failed"):
    bad.submit([1], [1]).result(5)
  bad.stop()


def test_stop_drains_the_queue_then_refuses():
  gate = threading.Event()
  b = B.Batcher(Recorder(gate=gate), B.BatchLimits(max_batch=2, max_wait_ms=0,
                                                   length_buckets=(8,))).start()
  futures = [b.submit([i], [1]) for i in range(5)]
  threading.Timer(0.1, gate.set).start()
  b.stop(drain=True)
  assert [f.result(0) for f in futures] == [[i * 10] for i in range(5)]
  with pytest.raises(B.ShuttingDownError):
    b.submit([9], [1])


# ----------------------------------------------------------------------------- the HTTP server

import random   # pylint: disable=g-import-not-at-top,wrong-import-position
import socket   # pylint: disable=g-import-not-at-top,wrong-import-position

import numpy as np   # pylint: disable=g-import-not-at-top,wrong-import-position

DATA_DIR = "/work/shared/data"
LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
LONG = " ".join(f"Anna{i % 7} met Bob in Rome{i % 3} ." for i in range(12))   # several windows


def _tiny_dir(tmp, head, num_labels, names):
  import jax   # pylint: disable=g-import-not-at-top
  from lib import model_io, models   # pylint: disable=g-import-not-at-top
  args = models.ModelArgs(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, max_len=64)
  params, _ = models.init_params(models.build(args, head, num_labels), jax.random.key(3))
  return model_io.save_model_dir(os.path.join(tmp, head), args, params, head, num_labels, names,
                                 tokenizer="minilm")


class Running:
  """A Server on a free loopback port, in a thread (uvicorn), stopped with `close`."""

  def __init__(self, model_dir, limits=None, window=(16, 4), **batch):
    import httpx, uvicorn   # pylint: disable=g-import-not-at-top,multiple-imports
    from lib import model_io   # pylint: disable=g-import-not-at-top
    from lib.serving import app as A, engine as E   # pylint: disable=g-import-not-at-top
    self.model = model_io.load_for_inference(model_dir, data_dir=DATA_DIR)
    lim = B.BatchLimits(**dict(dict(max_batch=2, max_tokens=64, max_wait_ms=2,
                                    length_buckets=(16,)), **batch))
    self.engine = E.Engine(self.model, lim, window=window)
    self.engine.warm_up()
    self.server = A.Server(self.engine, limits or A.Limits())
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    self.uv = uvicorn.Server(uvicorn.Config(self.server.app, host="127.0.0.1", port=port,
                                            log_level="warning"))
    self.thread = threading.Thread(target=self.uv.run, daemon=True)
    self.thread.start()
    while not self.uv.started:
      time.sleep(0.02)
    self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)

  def close(self):
    self.client.close()
    self.uv.should_exit = True
    self.thread.join(10)
    self.engine.batcher.stop()
    assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def ner_server(tmp_path_factory):
  run = Running(_tiny_dir(str(tmp_path_factory.mktemp("m")), "token_cls", 5, LABELS))
  yield run
  run.close()


def _offline_tags(model, words, tmp):
  """Word tags through the fine-tuning evaluation path: a CoNLL file -> windowed batches ->
  argmax -> one tag per word (lib.tasks.ner.collect_word_predictions)."""
  import jax   # pylint: disable=g-import-not-at-top
  from lib import data   # pylint: disable=g-import-not-at-top
  from lib.tasks import common, ner   # pylint: disable=g-import-not-at-top
  folder = os.path.join(tmp, "conll")
  os.makedirs(folder, exist_ok=True)
  for split in ("train", "test"):
    with open(os.path.join(folder, f"{split}.txt"), "w", encoding="utf-8") as f:
      f.write("\n\n".join("\n".join(f"{w} O" for w in ws) for ws in words) + "\n")
  batches = list(data.make_batches(f"conll:{folder}", "test", model.tokenizer, batch_size=3,
                                   max_len=16, stride=4, label_names=LABELS,
                                   cache_dir=os.path.join(tmp, "cache")))
  predict = jax.jit(common.argmax_predict(model.module))
  preds = [np.asarray(predict(model.params, b)) for b in batches]
  return ner.collect_word_predictions(batches, preds, [len(w) for w in words], LABELS)


def test_ner_equals_offline_predictions_including_a_long_text(ner_server, tmp_path):
  from lib import metrics   # pylint: disable=g-import-not-at-top
  from lib.serving import engine as E   # pylint: disable=g-import-not-at-top
  texts = ["John Smith lives in Paris.", LONG, "Ünïcode café, naïve!"]
  r = ner_server.client.post("/v1/ner", json={"texts": texts})
  assert r.status_code == 200, r.text
  results = r.json()["results"]
  words = [[w for w, _, _ in E.split_words(t)] for t in texts]
  assert len(ner_server.engine.ner_units(LONG)[1]) > 2        # the long text is windowed
  assert [[w["word"] for w in res["words"]] for res in results] == words
  offline = _offline_tags(ner_server.model, words, str(tmp_path))
  assert [[w["tag"] for w in res["words"]] for res in results] == offline
  for text, res, tags in zip(texts, results, offline):
    for w in res["words"]:
      assert text[w["start"]:w["end"]] == w["word"]
    spans = [(e["type"], e["text"]) for e in res["entities"]]
    ws = res["words"]
    ref = metrics.get_entities(tags)
    assert spans == [(t, text[ws[b]["start"]:ws[e]["end"]]) for t, b, e in ref]


def test_malformed_requests_fuzz(ner_server):
  """>= 1,000 malformed requests: each a 4xx JSON error naming a field; the server stays up."""
  rng = random.Random(0)
  good = json.dumps({"texts": ["a b"]}).encode()
  makers = [
      lambda: good[:rng.randrange(1, len(good) - 1)],                       # cut JSON
      lambda: bytes(rng.randrange(128, 256) for _ in range(rng.randrange(1, 20))),   # not UTF-8
      lambda: json.dumps({"texts": []}).encode(),
      lambda: json.dumps({"texts": [rng.choice([1, None, 2.5, [], {}, True])]}).encode(),
      lambda: json.dumps({"texts": "a string"}).encode(),
      lambda: json.dumps({"texts": ["a"], f"x{rng.randrange(99)}": 1}).encode(),
      lambda: json.dumps(rng.choice([[], 1, "s", None])).encode(),
      lambda: json.dumps({}).encode(),
      lambda: json.dumps({"texts": ["a"] * 65}).encode(),                  # over max_texts
      lambda: json.dumps({"texts": ["a" * 20_001]}).encode(),              # over max_chars
      lambda: b"x" * ((1 << 20) + 1),                                      # over max_body_bytes
  ]
  statuses, compiled = set(), ner_server.engine.compiles_since_ready()
  for i in range(1100):
    body = makers[i % len(makers)]()
    r = ner_server.client.post(rng.choice(["/v1/ner", "/v1/embed"]), content=body)
    assert 400 <= r.status_code < 500, (body[:80], r.status_code, r.text)
    err = r.json()["error"]
    assert err["field"] and err["message"] and err["code"] == r.status_code
    statuses.add(r.status_code)
  assert statuses == {400, 413, 422}
  assert ner_server.client.get("/healthz").json() == {"status": "ok"}
  assert ner_server.client.post("/v1/ner", json={"texts": ["ok"]}).status_code == 200
  assert ner_server.engine.compiles_since_ready() == compiled      # no request compiled
  assert "serve_errors_total" in ner_server.client.get("/metrics").text
  assert ner_server.engine.batcher.depth == 0


def test_field_names_routes_and_readiness(ner_server):
  c = ner_server.client
  r = c.post("/v1/ner", json={"texts": ["a", 3]})
  assert r.status_code == 422 and r.json()["error"]["field"] == "texts[1]"
  assert c.post("/v1/classify", json={"texts": ["a"]}).status_code == 404   # token_cls head
  assert c.get("/v1/ner").status_code == 405 and "error" in c.get("/v1/ner").json()
  ready = c.get("/readyz").json()
  assert ready["status"] == "ready" and ready["endpoints"] == ["ner", "embed"]
  assert c.get("/openapi.json").json()["paths"]["/v1/ner"]["post"]["requestBody"]
  r = c.post("/v1/embed", json={"texts": ["x " * 20]})     # 22 tokens > the 16 bucket: refused
  assert r.status_code == 413 and r.json()["error"]["field"] == "texts[0]"


def test_classify_embed_auth_and_overload(tmp_path):
  from lib.serving import app as A   # pylint: disable=g-import-not-at-top
  run = Running(_tiny_dir(str(tmp_path), "seq_cls", 2, ["neg", "pos"]),
                A.Limits(api_key="s3cret", max_concurrent=1))
  try:
    c, key = run.client, {"x-api-key": "s3cret"}
    texts = ["a fine film", "dull", "a fine film"]
    assert c.post("/v1/classify", json={"texts": texts}).status_code == 401
    assert c.post("/v1/classify", json={"texts": texts}, headers={"x-api-key": "s3creT"}
                  ).status_code == 401
    res = c.post("/v1/classify", json={"texts": texts}, headers=key).json()["results"]
    # Reference: the module on each text alone, unpadded (jitted: eager op-by-op is slower).
    import jax   # pylint: disable=g-import-not-at-top
    apply = jax.jit(lambda x: run.model.module.apply({"params": run.model.params}, input_ids=x))
    for text, got in zip(texts, res):
      out, _ = apply(np.asarray([run.model.tokenizer(text)["input_ids"]], np.int32))
      p = np.exp(np.asarray(out["logits"][0], np.float64))
      p /= p.sum()
      assert got["label"] == ["neg", "pos"][int(p.argmax())]
      np.testing.assert_allclose([got["probabilities"]["neg"], got["probabilities"]["pos"]], p,
                                 atol=1e-5)
    assert res[0]["label"] == res[2]["label"]
    emb = np.asarray(c.post("/v1/embed", json={"texts": texts}, headers=key).json()["embeddings"])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    run.server.inflight = 1          # as if one request were being served: the next is refused
    r = c.post("/v1/classify", json={"texts": ["a"]}, headers=key)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    run.server.inflight = 0
  finally:
    run.close()


def test_torch_baseline_server_answers_ner_and_classify(tmp_path):
  """The load test's PyTorch baseline behind the same app: both endpoints answer 200 with the
  pipeline's own output (entities within the text; probabilities summing to 1)."""
  from fastapi.testclient import TestClient   # pylint: disable=g-import-not-at-top
  from lib import model_io   # pylint: disable=g-import-not-at-top
  from lib.serving import app as A, torch_engine as T   # pylint: disable=g-import-not-at-top
  for head, names, path, check in (
      ("token_cls", ["O", "B-PER", "I-PER"], "/v1/ner", lambda r, t: all(
          t[e["start"]:e["end"]] and e["type"] == "PER" for e in r["entities"])),
      ("seq_cls", ["neg", "pos"], "/v1/classify", lambda r, t: abs(
          sum(r["probabilities"].values()) - 1) < 1e-5 and r["label"] in ("neg", "pos"))):
    hf_dir = str(tmp_path / f"{head}_hf")
    model_io.ours_to_hf(_tiny_dir(str(tmp_path), head, len(names), names), hf_dir, DATA_DIR)
    engine = T.TorchEngine(hf_dir, head)
    engine.warm_up()
    client = TestClient(A.Server(engine, A.Limits()).app)
    texts = ["Ada Lovelace met Charles Babbage in London .", "a b"]
    r = client.post(path, json={"texts": texts})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 2 and all(check(res, t) for res, t in zip(results, texts)), results
    engine.batcher.stop()


@pytest.mark.slow
def test_minilm_embeddings_equal_sentence_transformers_pooling():
  """all-MiniLM-L6-v2's sentence-transformers output: mean over BertModel's last hidden state
  (attention mask), then L2 normalisation; here computed with transformers (PyTorch) + numpy."""
  import torch, transformers   # pylint: disable=g-import-not-at-top,multiple-imports
  from lib import hf, model_io   # pylint: disable=g-import-not-at-top
  from lib.serving import engine as E   # pylint: disable=g-import-not-at-top
  model = model_io.load_for_inference("minilm", data_dir=DATA_DIR)
  eng = E.Engine(model, B.BatchLimits(max_batch=4, max_tokens=4 * 32, max_wait_ms=0,
                                      length_buckets=(32,)))
  texts = ["A man is eating food.", "The quick brown fox jumps over the lazy dog", "Hi"]
  units = eng.encode(texts)
  outs = eng._run_batch(units, (4, 32))  # pylint: disable=protected-access
  got = np.stack([o["embedding"] for o in outs])
  tok = hf.load_bert_tokenizer("minilm")
  ref_model = transformers.BertModel.from_pretrained(hf.resolve_model_dir("minilm")).eval()
  enc = tok(texts, padding=True, return_tensors="pt")
  with torch.no_grad():
    h = ref_model(**enc).last_hidden_state.numpy().astype(np.float64)
  m = enc["attention_mask"].numpy()[..., None]
  ref = (h * m).sum(1) / m.sum(1)
  ref /= np.linalg.norm(ref, axis=1, keepdims=True)
  cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1)
  assert np.all(1 - cos < 1e-5), 1 - cos


# ----------------------------------------------------------------------------- /v1/generate

def test_filter_rows_equals_lib_sampling_per_row():
  import jax   # pylint: disable=g-import-not-at-top
  from lib import sampling   # pylint: disable=g-import-not-at-top
  from lib.serving import engine as E   # pylint: disable=g-import-not-at-top
  logits = jax.random.normal(jax.random.key(0), (3, 50))
  settings = [(5, 1.0), (0, 0.7), (4, 0.5)]
  got = E.filter_rows(logits, np.array([k for k, _ in settings]),
                      np.array([p for _, p in settings], np.float32))
  for row, (k, p) in enumerate(settings):
    want = sampling.filter_logits(logits[row], k, p)
    np.testing.assert_array_equal(np.isfinite(got[row]), np.isfinite(want))


def _reference_generation(model, prompt, max_new, temperature, seed, index):
  """lib.sampling's sampler (static settings, its own batch) on one prompt; prompt `index` of a
  request draws with fold_in(key(seed), index)."""
  import jax   # pylint: disable=g-import-not-at-top
  from lib import sampling   # pylint: disable=g-import-not-at-top
  fn = jax.jit(sampling.make_sample_fn(model.module, sampling.SampleArgs(max_new, temperature)))
  ids = model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
  batch = sampling.prompt_batch([ids], max_new, 0, 0)
  batch["key"][0] = np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(seed),
                                                                      index)))
  out = fn(model.params, batch)
  new, = sampling.continuations(out, batch["prompt_len"], max_new, model.tokenizer.eos_token_id)
  return model.tokenizer.decode(new)


def _stream(client, body) -> list:
  """The texts of a streamed /v1/generate: the growing pieces of each prompt joined, checked
  against each prompt's final `done` event; the stream ends with [DONE]."""
  pieces, final, events = {}, {}, []
  with client.stream("POST", "/v1/generate", json=body) as r:
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    for line in r.iter_lines():
      if line.startswith("data: "):
        events.append(line[6:])
  assert events[-1] == "[DONE]", events
  for e in map(json.loads, events[:-1]):
    if e.get("done"):
      final[e["index"]] = e["text"]
    else:
      pieces[e["index"]] = pieces.get(e["index"], "") + e["text"]
  assert sorted(final) == list(range(len(body["prompts"])))
  for i, text in final.items():
    assert text.startswith(pieces.get(i, "")), (pieces, final)
  return [final[i] for i in range(len(final))]


@pytest.mark.slow
def test_generate_greedy_and_sampled_equal_lib_sampling(tmp_path):
  import jax   # pylint: disable=g-import-not-at-top
  from lib import model_io, models   # pylint: disable=g-import-not-at-top
  args = models.ModelArgs(arch="gpt2", vocab_size=50257, hidden_size=32, num_layers=1,
                          num_heads=2, mlp_dim=64, max_len=32, activation="gelu_new",
                          layer_norm_eps=1e-5)
  params, _ = models.init_params(models.build(args, "lm"), jax.random.key(5))
  src = model_io.save_model_dir(str(tmp_path / "gpt"), args, params, "lm")
  from lib.serving import app as A   # pylint: disable=g-import-not-at-top
  run = Running(src, limits=A.Limits(stream_chunk=2), max_batch=2, max_tokens=64,
                length_buckets=(32,))
  try:
    c, prompts = run.client, ["Hello world", "The cat sat on", "A"]
    compiled = run.engine.compiles_since_ready()
    greedy = c.post("/v1/generate", json={"prompts": prompts, "max_tokens": 6})
    assert greedy.status_code == 200, greedy.text
    top1 = c.post("/v1/generate", json={"prompts": prompts, "max_tokens": 6, "top_k": 1,
                                        "temperature": 0.7, "seed": 4}).json()["results"]
    body = {"prompts": prompts[:2], "max_tokens": 5, "temperature": 0.9, "seed": 7}
    hot = [r["text"] for r in c.post("/v1/generate", json=body).json()["results"]]
    alone = c.post("/v1/generate", json=dict(body, prompts=prompts[:1])).json()["results"]
    streamed = [_stream(c, dict(body, stream=True)), _stream(c, {"prompts": prompts,
                                                                 "max_tokens": 6, "stream": True})]
    # The compile counter is process-wide: read it before the references below compile.
    assert run.engine.compiles_since_ready() == compiled   # no setting compiled anything
    texts = [r["text"] for r in greedy.json()["results"]]
    assert texts == [_reference_generation(run.model, p, 6, 0.0, 0, i)
                     for i, p in enumerate(prompts)]
    assert [r["text"] for r in top1] == texts          # top-1 sampling is greedy
    assert hot == [_reference_generation(run.model, p, 5, 0.9, 7, i)
                   for i, p in enumerate(prompts[:2])]
    assert alone[0]["text"] == hot[0]                  # a row's draw ignores its batch mates
    assert streamed == [hot, texts]       # 2-token chunks draw exactly the one-call tokens
    r = c.post("/v1/generate", json={"prompts": ["x " * 30], "max_tokens": 8})
    assert r.status_code == 413 and r.json()["error"]["field"] == "prompts[0]"
    r = c.post("/v1/generate", json={"prompts": ["a", ""], "max_tokens": 4})
    assert r.status_code == 422 and r.json()["error"]["field"] == "prompts[1]"
    assert c.post("/v1/embed", json={"texts": ["a"]}).status_code == 404
  finally:
    run.close()
