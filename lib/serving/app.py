"""The HTTP API (FastAPI): endpoints by head, request validation and limits, auth, metrics.

Every error is JSON `{"error": {"code", "field", "message"}}` where `field` names the request
field at fault (`texts[2]`, `body`, `top_p`). Limits: body bytes, texts per request, characters
per text, concurrent requests (beyond: 429 + Retry-After), a full queue or a model still warming
up (503 + Retry-After). An API key, when set, is compared in constant time (hmac.compare_digest).
`/v1/generate` with `"stream": true` answers Server-Sent Events, generated `stream_chunk` tokens
per model call (each chunk a unit of the shared batcher, so streams batch with other requests).
"""

import asyncio
import contextlib
import dataclasses
import hmac
import json
import time
from typing import Optional

import numpy as np
from absl import logging
import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from lib.serving import batcher as B
from lib.serving import engine as E
from lib.serving import prom


@dataclasses.dataclass
class Limits:
  """Request limits of the API (beyond the batcher's own)."""
  max_body_bytes: int = 1 << 20
  max_texts: int = 64
  max_chars: int = 20_000
  max_concurrent: int = 128
  timeout_s: float = 60.0
  api_key: Optional[str] = None
  retry_after_s: int = 1
  stream_chunk: int = 8          # tokens generated per model call of a streamed request


class ApiError(Exception):
  def __init__(self, code: int, field: str, message: str, retry_after: Optional[int] = None):
    super().__init__(message)
    self.code, self.field, self.message, self.retry_after = code, field, message, retry_after


class _Strict(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="forbid", strict=True)


class TextsRequest(_Strict):
  """Several texts per request."""
  texts: list[str] = pydantic.Field(min_length=1)


class GenerateRequest(_Strict):
  """Prompts and sampling: temperature 0 = greedy; top_k 0 and top_p 1 switch the filters off."""
  prompts: list[str] = pydantic.Field(min_length=1)
  max_tokens: int = pydantic.Field(32, ge=1, le=1024)
  temperature: float = pydantic.Field(0.0, ge=0.0, le=100.0)
  top_k: int = pydantic.Field(0, ge=0)
  top_p: float = pydantic.Field(1.0, gt=0.0, le=1.0)
  seed: int = pydantic.Field(0, ge=0, lt=2 ** 31)
  stream: bool = False


def _field(loc) -> str:
  out = ""
  for part in loc:
    out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
  return out or "body"


def _error(code, field, message, retry_after=None) -> JSONResponse:
  headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
  return JSONResponse({"error": dict(code=code, field=field, message=message)}, code,
                      headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
  length = request.headers.get("content-length")
  if length is not None and (not length.isdigit() or int(length) > limit):
    raise ApiError(413, "body", f"request body of {length} bytes; at most {limit} bytes")
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > limit:
      raise ApiError(413, "body", f"request body over {limit} bytes")
    chunks.append(chunk)
  return b"".join(chunks)


async def parse(request: Request, model, limits: Limits):
  """The request body as `model`, or ApiError naming the field (400 bad JSON, 422 bad fields)."""
  raw = await _read_body(request, limits.max_body_bytes)
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ApiError(400, "body", f"not UTF-8: byte {e.start} is invalid") from None
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise ApiError(400, "body", f"not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
  if not isinstance(data, dict):
    raise ApiError(422, "body", f"expected a JSON object, got {type(data).__name__}")
  try:
    return model.model_validate(data)
  except pydantic.ValidationError as e:
    err = e.errors()[0]
    raise ApiError(422, _field(err["loc"]),
                   f"{err['msg']} ({len(e.errors())} problem(s))") from None


def check_texts(texts, limits: Limits, field: str) -> None:
  if len(texts) > limits.max_texts:
    raise ApiError(413, field, f"{len(texts)} texts; at most {limits.max_texts} per request")
  for i, t in enumerate(texts):
    if len(t) > limits.max_chars:
      raise ApiError(413, f"{field}[{i}]", f"{len(t)} characters; at most {limits.max_chars}")


class Server:
  """The app's state: engine, limits, metrics, in-flight count. `app` is the FastAPI app."""

  def __init__(self, engine, limits: Limits):
    self.engine, self.limits = engine, limits
    self.inflight = 0
    self.metrics = prom.Registry()
    m = self.metrics
    m.gauge("serve_queue_depth", "units waiting for the model", lambda: engine.batcher.depth)
    m.gauge("serve_inflight_requests", "requests being served", lambda: self.inflight)
    m.gauge("serve_compilations_after_warmup", "XLA compilations since ready (0 expected)",
            engine.compiles_since_ready)
    engine.batcher.on_batch = lambda rows, shape: m.observe(
        "serve_batch_size", "units per model call", rows, prom.BATCH_BUCKETS)
    engine.batcher.in_flight = lambda: self.inflight   # no waiting for requests that are not there
    self.app = self._build()

  async def _await(self, fut):
    try:
      return await asyncio.wait_for(asyncio.wrap_future(fut), self.limits.timeout_s)
    except asyncio.TimeoutError:
      raise ApiError(503, "body", "timed out waiting for the model", self.limits.retry_after_s)

  async def submit(self, units):
    if not self.engine.ready:
      raise ApiError(503, "body", "the model is warming up", self.limits.retry_after_s)
    try:
      fut = self.engine.submit(units)
    except B.QueueFullError as e:
      raise ApiError(503, "body", str(e), self.limits.retry_after_s) from None
    except B.ShuttingDownError as e:
      raise ApiError(503, "body", str(e), self.limits.retry_after_s) from None
    return await self._await(fut)

  def _need(self, endpoint):
    if endpoint not in self.engine.endpoints:
      raise ApiError(404, "path", f"/v1/{endpoint} is not served for a model with head "
                     f"{self.engine.model.head!r}; served: {list(self.engine.endpoints)}")

  async def ner(self, request: Request):
    self._need("ner")
    req = await parse(request, TextsRequest, self.limits)
    check_texts(req.texts, self.limits, "texts")
    per_text = [self.engine.ner_units(t) for t in req.texts]
    units = [w["input_ids"] for _, wins in per_text for w in wins]
    outputs = await self.submit(units) if units else []
    answers, k = [], 0
    for text, (words, wins) in zip(req.texts, per_text):
      answers.append(self.engine.ner_answer(text, words, wins, outputs[k:k + len(wins)]))
      k += len(wins)
    return {"results": answers}

  async def _encoded(self, request):
    req = await parse(request, TextsRequest, self.limits)
    check_texts(req.texts, self.limits, "texts")
    try:
      units = self.engine.encode(req.texts)
    except E.TooLongError as e:
      raise ApiError(413, str(e).split(":")[0], str(e)) from None
    return await self.submit(units)

  async def classify(self, request: Request):
    self._need("classify")
    return {"results": [self.engine.classify_answer(o) for o in await self._encoded(request)]}

  async def embed(self, request: Request):
    self._need("embed")
    outs = await self._encoded(request)
    return {"embeddings": [np.asarray(o["embedding"]).tolist() for o in outs],
            "dimension": int(len(outs[0]["embedding"]))}

  def _build(self) -> FastAPI:
    app = FastAPI(title="workbench model server", version="1", lifespan=self._lifespan)
    schema = lambda m: {"requestBody": {"required": True, "content": {"application/json": {
        "schema": m.model_json_schema()}}}}
    for name, model in (("ner", TextsRequest), ("classify", TextsRequest),
                        ("embed", TextsRequest), ("generate", GenerateRequest)):
      app.add_api_route(f"/v1/{name}", self._guarded(name), methods=["POST"],
                        openapi_extra=schema(model), summary=f"POST /v1/{name}")
    app.add_api_route("/healthz", lambda: {"status": "ok"}, methods=["GET"])
    app.add_api_route("/readyz", self._readyz, methods=["GET"])
    app.add_api_route("/metrics", lambda: PlainTextResponse(self.metrics.render()),
                      methods=["GET"])
    app.add_exception_handler(404, lambda r, e: _error(404, "path", f"no route {r.url.path}"))
    app.add_exception_handler(405, lambda r, e: _error(405, "method",
                                                       f"{r.method} not allowed on {r.url.path}"))
    return app

  @contextlib.asynccontextmanager
  async def _lifespan(self, app):
    del app
    yield
    # Shutdown: uvicorn has answered the in-flight requests; stop the worker after the queue.
    await asyncio.to_thread(self.engine.batcher.stop, True)
    logging.info("stopped: %d batches, %d units, %d compilations after warm-up",
                 self.engine.batcher.batches, self.engine.batcher.units,
                 self.engine.compiles_since_ready())

  def _readyz(self):
    if not self.engine.ready:
      return _error(503, "model", "warming up", self.limits.retry_after_s)
    return {"status": "ready", "compilations_after_warmup": self.engine.compiles_since_ready(),
            "endpoints": list(self.engine.endpoints)}

  def _guarded(self, name):
    handler = self.generate if name == "generate" else getattr(self, name)

    async def endpoint(request: Request):
      t0, code = time.perf_counter(), 200
      try:
        self._auth(request)
        if self.inflight >= self.limits.max_concurrent:
          raise ApiError(429, "body", f"{self.inflight} requests in flight; at most "
                         f"{self.limits.max_concurrent}", self.limits.retry_after_s)
        self.inflight += 1
        try:
          return await handler(request)
        finally:
          self.inflight -= 1
      except ApiError as e:
        code = e.code
        return _error(e.code, e.field, e.message, e.retry_after)
      finally:
        self._record(name, code, time.perf_counter() - t0)
    endpoint.__name__ = name
    return endpoint

  def _auth(self, request: Request) -> None:
    key = self.limits.api_key
    if not key:
      return
    given = request.headers.get("x-api-key", "")
    if not hmac.compare_digest(given.encode("utf-8", "replace"), key.encode("utf-8")):
      raise ApiError(401, "x-api-key", "missing or wrong API key (header x-api-key)")

  def _record(self, name, code, seconds) -> None:
    m = self.metrics
    m.counter("serve_requests_total", "requests by endpoint and status", endpoint=name, code=code)
    if code >= 400:
      m.counter("serve_errors_total", "error responses by endpoint and status", endpoint=name,
                code=code)
    m.observe("serve_request_seconds", "request latency", seconds, prom.LATENCY_BUCKETS,
              endpoint=name)

  async def generate(self, request: Request):
    self._need("generate")
    req = await parse(request, GenerateRequest, self.limits)
    check_texts(req.prompts, self.limits, "prompts")
    try:
      units = self.engine.generate_units(req)
    except E.TooLongError as e:
      raise ApiError(413, str(e).split(":")[0], str(e)) from None
    except E.BadInputError as e:
      raise ApiError(422, str(e).split(":")[0], str(e)) from None
    if req.stream:
      return await self._stream(units)
    return {"results": [{"text": self.engine.decode(o)} for o in await self.submit(units)]}

  async def _stream(self, units) -> StreamingResponse:
    """Server-Sent Events: `{"index", "text"}` as each prompt's text grows, `{"index", "done":
    true, "text"}` with its whole text when it ends, then `[DONE]`. The first chunk is generated
    before answering, so that a full queue is still a 503; a later failure is an `error` event."""
    chunk = self.limits.stream_chunk
    new, sent = [[] for _ in units], [""] * len(units)
    live = list(range(len(units)))
    first = await self.submit([self.engine.next_chunk(u, [], chunk) for u in units])

    def advance(rows, outs):
      events, still = [], []
      for i, out in zip(rows, outs):
        asked = min(chunk, units[i]["max_new"] - len(new[i]))
        new[i] += out
        text = self.engine.decode(new[i])
        done = len(out) < asked or len(new[i]) >= units[i]["max_new"]
        if done:
          events.append(dict(index=i, done=True, text=text))
          continue
        still.append(i)
        if not text.endswith("\ufffd") and len(text) > len(sent[i]):  # whole characters only
          events.append(dict(index=i, text=text[len(sent[i]):]))
          sent[i] = text
      return events, still

    async def events():
      nonlocal live
      self.inflight += 1            # the stream is in flight until its last event
      try:
        outs = first
        while True:
          batch, live = advance(live, outs)
          for e in batch:
            yield f"data: {json.dumps(e)}\n\n"
          if not live:
            break
          try:
            outs = await self.submit([self.engine.next_chunk(units[i], new[i], chunk)
                                      for i in live])
          except ApiError as e:
            yield f"event: error\ndata: {json.dumps(dict(code=e.code, message=e.message))}\n\n"
            return
        yield "data: [DONE]\n\n"
      finally:
        self.inflight -= 1
    return StreamingResponse(events(), media_type="text/event-stream")
