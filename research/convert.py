"""Convert checkpoints: Hugging Face <-> ours (model.json + orbax params).

  # HF BERT / GPT-2 directory (or the installed MiniLM) -> our model directory
  ./run.sh convert --to=ours --src=minilm --dst=/tmp/minilm_ours
  # our model directory or a fine-tuning/pretraining workdir -> HF directory (PyTorch loadable)
  ./run.sh convert --to=hf --src=workdirs/ner --dst=/tmp/ner_hf

The head comes from the source (HF config `architectures`, or our model.json); a HF directory
written here loads with transformers' matching class (e.g. BertForTokenClassification) with no
missing or unexpected keys. --check reloads the written checkpoint and compares every tensor.
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from lib import hf, model_io, models, peft  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_enum("to", None, ["ours", "hf"], "target format")
flags.DEFINE_string("src", None, "HF dir or 'minilm' (--to=ours); our model dir or run workdir "
                    "(--to=hf)")
flags.DEFINE_string("dst", None, "output directory (written atomically; replaced if it exists)")
flags.DEFINE_string("data_dir", common.DATA_DIR, "shared data (GPT-2 BPE tables)")
flags.DEFINE_bool("check", True, "reload the output and compare every tensor with the source")
flags.mark_flags_as_required(["to", "src", "dst"])


def _max_diff(a: dict, b: dict) -> float:
  fa, fb = peft.flatten_paths(a), peft.flatten_paths(b)
  if set(fa) != set(fb):
    raise SystemExit(f"round trip changed the parameter paths: {sorted(set(fa) ^ set(fb))[:10]}")
  return max(float(abs(fa[k].astype("float64") - fb[k]).max()) for k in fa)


def main(argv):
  del argv
  if FLAGS.to == "ours":
    model = model_io.hf_to_ours(FLAGS.src, FLAGS.dst)
    back = model_io.load_model(FLAGS.dst, model.head, model.num_labels) if FLAGS.check else None
  else:
    model = model_io.ours_to_hf(FLAGS.src, FLAGS.dst, FLAGS.data_dir)
    back = None
    if FLAGS.check:
      _, params = hf.import_checkpoint(FLAGS.dst, model.head, model.num_labels)
      back = model_io.LoadedModel(model.args, model.head, model.num_labels, params, FLAGS.dst)
  print(f"{FLAGS.src} -> {FLAGS.dst}: {model.args.arch}, head={model.head}, "
        f"{models.param_count(model.params):,} parameters")
  if back is not None:
    print(f"check: reloaded {FLAGS.dst}, max |difference| over all tensors = "
          f"{_max_diff(model.params, back.params):.3g}")


if __name__ == "__main__":
  app.run(main)
