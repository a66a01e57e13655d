"""Serve a trained model over HTTP (FastAPI + uvicorn) with dynamic batching.

  ./run.sh serve --model=workdirs/ner                      # POST /v1/ner, /v1/embed
  ./run.sh serve --model=workdirs/sst2 --port=8001         # POST /v1/classify, /v1/embed
  ./run.sh serve --model=minilm                            # POST /v1/embed (sentence embeddings)
  .venv/bin/python research/serve.py --model=workdirs/sst2_lora --adapter=workdirs/sst2_lora/adapter
  ./run.sh serve --model=workdirs/gpt2_lm                   # POST /v1/generate
  curl -s localhost:8000/v1/ner -d '{"texts": ["John lives in Paris."]}'
  curl -s localhost:8000/v1/generate -d '{"prompts": ["Once"], "max_tokens": 20, "top_p": 0.9,
                                          "temperature": 0.8, "seed": 1}'

Endpoints follow the model's head (lib/serving/engine.py ENDPOINTS); GET /healthz, /readyz
(after warm-up compiled every batch shape), /metrics (Prometheus), /docs (OpenAPI). Binds
127.0.0.1 unless --host says otherwise. The API key, if any, is read from the environment variable
named by --api_key_env (never a flag: flags show in `ps`). Ctrl-C / SIGTERM stop accepting,
answer what is queued, then exit.
"""

import os
import sys
import threading

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from lib import cli, errors  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "model source: run workdir (@best/@latest/@<step>), our model "
                    "dir, a Hugging Face dir or 'minilm'")
flags.DEFINE_string("adapter", "", "adapter dir (peft.save_adapter) merged into --model at load")
flags.DEFINE_string("host", "127.0.0.1", "address to bind (default loopback only)")
flags.DEFINE_integer("port", 8000, "port")
flags.DEFINE_integer("max_batch", 32, "units (texts / windows) per model call; 1 = no batching")
flags.DEFINE_integer("max_tokens", 8192, "padded tokens per model call")
flags.DEFINE_float("max_wait_ms", 5.0, "how long the oldest queued unit waits for company")
flags.DEFINE_integer("call_overhead_tokens", 128, "a batch is split into model calls of similar "
                     "length when that saves more padded tokens than this per extra call")
flags.DEFINE_integer("max_queue", 2048, "queued units beyond which requests get 503")
flags.DEFINE_list("length_buckets", ["16", "32", "64", "128"], "padded sequence lengths")
flags.DEFINE_integer("max_texts", 64, "texts per request")
flags.DEFINE_integer("max_chars", 20000, "characters per text")
flags.DEFINE_integer("max_body_bytes", 1 << 20, "request body bytes")
flags.DEFINE_integer("max_concurrent", 256, "requests in flight beyond which requests get 429")
flags.DEFINE_integer("stream_chunk", 8, "/v1/generate with stream: tokens per model call (each "
                     "call one batcher unit per prompt; smaller = earlier first tokens)")
flags.DEFINE_string("api_key_env", "", "environment variable holding the API key ('' = none)")
flags.DEFINE_string("tokenizer", "", "tokenizer location overriding the model's own")
flags.DEFINE_string("data_dir", common.DATA_DIR, "shared data folder (GPT-2 BPE tables)")
flags.DEFINE_enum("backend", "jax", ["jax", "torch"], "jax: our engine (dynamic batching); torch: "
                  "a Hugging Face PyTorch pipeline per request, the load test's baseline (our "
                  "model dirs and run workdirs are converted to a temporary HF dir first)")
flags.DEFINE_integer("torch_threads", 0, "--backend=torch: torch intra-op threads (0 = default)")
flags.mark_flags_as_required(["model"])


def load(source, adapter):
  """The inference model, with `adapter` loaded and LoRA-style factors merged."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from lib import model_io, models, peft  # pylint: disable=g-import-not-at-top
  model = model_io.load_for_inference(source, data_dir=FLAGS.data_dir, tokenizer=FLAGS.tokenizer)
  params = peft.load_adapter(adapter, model.params) if adapter else model.params
  params, args = peft.merge(params, model.args)
  return dataclasses.replace(model, params=params, args=args,
                             module=models.build(args, model.head, model.num_labels))


def torch_engine(source):
  """--backend=torch: a TorchEngine of `source` (converted to a temporary HF dir if it is ours)."""
  import shutil, tempfile  # pylint: disable=g-import-not-at-top,multiple-imports
  from lib import model_io  # pylint: disable=g-import-not-at-top
  from lib.serving import torch_engine as T  # pylint: disable=g-import-not-at-top
  path = model_io.split_source(source)[0]
  head = model_io.head_of(source)[0]
  if not os.path.exists(os.path.join(path, model_io.MODEL_JSON)):
    return T.TorchEngine(path, head, FLAGS.torch_threads)
  # Removed as soon as the pipeline holds the weights: uvicorn ends on SIGTERM without atexit.
  tmp = tempfile.mkdtemp(prefix="serve-torch-")
  try:
    model_io.ours_to_hf(source, os.path.join(tmp, "hf"), FLAGS.data_dir)
    return T.TorchEngine(os.path.join(tmp, "hf"), head, FLAGS.torch_threads)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import uvicorn  # pylint: disable=g-import-not-at-top
  from lib.serving import app as A, batcher as B, engine as E  # pylint: disable=g-import-not-at-top
  key = ""
  if FLAGS.api_key_env:
    key = os.environ.get(FLAGS.api_key_env, "")
    if not key:
      raise errors.ConfigError(f"--api_key_env={FLAGS.api_key_env}: the variable is unset or "
                               "empty")
  try:
    buckets = tuple(sorted(int(b) for b in FLAGS.length_buckets))
  except ValueError:
    raise errors.ConfigError(f"--length_buckets={FLAGS.length_buckets}: expected integers") \
        from None
  if FLAGS.backend == "torch":
    engine = torch_engine(FLAGS.model)
  else:
    model = load(FLAGS.model, FLAGS.adapter)
    engine = E.Engine(model, B.BatchLimits(FLAGS.max_batch, FLAGS.max_tokens, FLAGS.max_wait_ms,
                                           FLAGS.max_queue, buckets, FLAGS.call_overhead_tokens))
  if not engine.endpoints:
    raise errors.ModelSourceError(f"--model={FLAGS.model}: head {engine.model.head!r} has no "
                                  "served endpoint")
  server = A.Server(engine, A.Limits(FLAGS.max_body_bytes, FLAGS.max_texts, FLAGS.max_chars,
                                     FLAGS.max_concurrent, api_key=key or None,
                                     stream_chunk=FLAGS.stream_chunk))
  threading.Thread(target=engine.warm_up, name="warm-up", daemon=True).start()
  logging.info("serving %s (%s, head %r: %s) on http://%s:%d", FLAGS.model, FLAGS.backend,
               engine.model.head, list(engine.endpoints), FLAGS.host, FLAGS.port)
  uvicorn.run(server.app, host=FLAGS.host, port=FLAGS.port, log_level="warning",
              timeout_graceful_shutdown=30)


if __name__ == "__main__":
  cli.run(main)
