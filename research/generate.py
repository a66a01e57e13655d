"""Sample text from a causal LM: a GPT-2 pretraining workdir, one of our model dirs or a HF dir.

  ./run.sh generate --model=workdirs/clm_gpt2_mini --prompt="ROMEO:" --prompt="The jury said"
  .venv/bin/python research/generate.py --model=/tmp/clm_quick --prompt="To be" --greedy \
      --max_new_tokens=30
  .venv/bin/python research/generate.py --model=/tmp/clm_quick --prompt="To be" --temperature=0.8 \
      --top_k=40 --top_p=0.95 --num_samples=3 --seed=1

Prints `[seed S] 'prompt' -> 'continuation'` per prompt and sample (Python string literals, so
newlines stay visible). The same --seed gives the same samples; --top_k=1 gives the greedy
continuation.
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from lib import cli, errors  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "pretraining workdir (its reported checkpoint; @latest or "
                    "@<step> for another), our model dir or a Hugging Face GPT-2 dir")
flags.DEFINE_multi_string("prompt", None, "text to continue (repeat the flag for several)")
flags.DEFINE_integer("max_new_tokens", 40, "tokens generated per prompt")
flags.DEFINE_bool("greedy", False, "argmax decoding (ignores temperature/top_k/top_p)")
flags.DEFINE_float("temperature", 1.0, "softmax temperature (<= 0: greedy)")
flags.DEFINE_integer("top_k", 0, "sample among the k most likely tokens (0 = all)")
flags.DEFINE_float("top_p", 1.0, "nucleus sampling: the smallest set with this probability mass")
flags.DEFINE_integer("num_samples", 1, "samples per prompt (seeds seed, seed+1, ...)")
flags.DEFINE_integer("seed", 0, "sampling seed")
flags.DEFINE_string("tokenizer", "", "tokenizer dir ('' = the model's own, else data_dir/gpt2-bpe)")
flags.DEFINE_string("data_dir", common.DATA_DIR, "shared data folder (the GPT-2 BPE default)")
flags.mark_flags_as_required(["model", "prompt"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from lib import model_io, sampling, sharding, train  # pylint: disable=g-import-not-at-top
  if model_io.describe(FLAGS.model).arch != "gpt2":
    raise errors.ConfigError(f"--model={FLAGS.model}: not a causal LM (GPT-2); BERT cannot "
                             "generate")
  model = model_io.load_for_inference(FLAGS.model, "lm", data_dir=FLAGS.data_dir,
                                      tokenizer=FLAGS.tokenizer)
  tokenizer, state = model.tokenizer, model.weights
  temperature = 0.0 if FLAGS.greedy else FLAGS.temperature
  args = sampling.SampleArgs(FLAGS.max_new_tokens, temperature, FLAGS.top_k, FLAGS.top_p)
  step = train.make_eval_step(sampling.make_sample_fn(model.module, args))
  mesh = sharding.make_mesh(sharding.default_mesh_config())
  bsh = sharding.batch_sharding(mesh, sharding.DEFAULT_RULES)
  for i in range(FLAGS.num_samples):
    texts = sampling.generate(step, state, tokenizer, FLAGS.prompt, args, bsh, seed=FLAGS.seed + i)
    for prompt, text in zip(FLAGS.prompt, texts):
      print(f"[seed {FLAGS.seed + i}] {prompt!r} -> {text!r}")


if __name__ == "__main__":
  cli.run(main)
