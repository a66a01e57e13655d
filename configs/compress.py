"""Compressing a fine-tuned model: int8 PTQ (dynamic, static), QAT, attention-head pruning and
unstructured pruning (research/compress.py, lib/quant.py, lib/prune.py).

  .venv/bin/python research/compress.py --config=configs/compress.py:sst2 \
      --model=workdirs/sst2 --out=/tmp/sst2_int8
  .venv/bin/python research/compress.py --config=configs/compress.py:ner+weight_only+quick \
      --model=workdirs/ner --out=/tmp/ner_int8w

Writes a model directory (int8 kernels + per-channel scales, model.json dot_general rules) and
prints one table row per model (float32 source, int8): parameters, file size, batch-1 latency
and batch 32x128 throughput (one process, interleaved), dev/test metric and the drop.

Variants (`:<a>+<b>`):
  sst2 | ner   the fine-tuning config whose evaluator scores both models (default sst2).
  w8a8         (default) int8 weights and dynamic per-token int8 activations: s8 x s8 -> s32.
  weight_only  int8 weights dequantised to float32 before a float matmul.
  qat          fine-tune --model 1 epoch on 2,000 sentences with fake-quantised (straight-through)
               kernels and inputs, then w8a8 PTQ of the result (the run: <out>_qat_run).
  static       int8 weights and activations with one activation scale per kernel, calibrated
               (max |input|) on the first 16 training batches: s8 x s8 -> s32.
  heads30 | heads50  remove 30% / 50% of the attention heads (Michel et al. importance on dev),
               physically; recover with research/finetune.py --config.model.init_from=<out>.
  neurons30 | neurons50  remove 30% / 50% of the FFN neurons (importance: |grad of a neuron
               mask| on dev, normalised per layer, global order), physically; heads30+neurons30
               removes both (scored together on the unpruned model).
  prune_magnitude70 | prune_movement70   (= magnitude+s70, movement+s70) fine-tune --model
               (2,000 training sentences, 2 epochs) pruning the encoder kernels to 70% zeros
               (cubic schedule over 10%-70% of the steps); --out is the run workdir, with
               sparse.npz (nonzero values + bitmask). s50 | s90: other targets.
  quick        the first 200 dev / test examples; fewer timing steps.
Measured (AMD EPYC, 2 cores with AVX512-VNNI, shared: load average ~10; full SST-2 dev 872 /
test 1,821; source /tmp/d13/teacher_sst2: MiniLM-L6 fine-tuned on 2,000 SST-2 sentences, 1 epoch):
  float32           83.4 MB params/, b1 48 ms, 32x128 8.5 seq/s, dev 0.7511, test 0.7661
  int8_w8a8         53.7 MB, b1 38 ms, 12.4 seq/s (1.47x), dev 0.7511, test 0.7677 (+0.16)
  int8_weight_only  53.7 MB, 32x128 1.04x, batch 1 slower (dequantises every call), test 0.7677
The word-embedding table stays float32 (46.9 MB): only Dense kernels go through the seat.
Same source and machine, issue 14 second round (each row's float32 timed in the same process):
  int8_static       53.7 MB, b1 59.2 -> 44.5 ms, 13.4 -> 23.9 seq/s (1.79x), dev 0.7523,
                    test 0.7738 (+0.77); 16 calibration batches of 32 training sentences
  heads30           21.63M params (-4.8%), 79.4 MB, b1 51.7 -> 45.0 ms, 11.7 -> 14.5 seq/s
                    (1.24x); 22 of 72 heads removed, kept (10, 12, 5, 8, 9, 6); dev 0.7466,
                    test 0.7501 (-1.59); after 1 recovery epoch (research/finetune.py, 2,000
                    sentences) dev 0.7924, test 0.8155
  magnitude-70%     70.0% zeros in the encoder kernels (global threshold), 2 epochs: dev 0.7672,
                    test 0.7743; sparse.npz 14.1 MB for the 42.5 MB of pruned kernels (62.5 MB
                    with the other parameters); no speedup (dense matmuls)
  movement-70%      global or per-kernel threshold: dev 0.5092, test 0.4964 (one class: collapsed;
                    see the third round for the cause)
  heads30 HF export transformers 5.23 loads it (no missing/unexpected keys), logits within 7e-8
  qat               1 epoch with int8_fake, then w8a8: 53.7 MB, 1.16x (load varied), dev 0.7867,
                    test 0.8199 (fake-quant eval before PTQ: dev 0.7878, test 0.8199)
  dense control     the source + 1 more float epoch (research/finetune.py, no compression): dev
                    0.7878, test 0.8199: the fair reference for qat and heads30 + recovery (2
                    epochs in all); the 1-epoch source is for the post-training rows
Issue 14 third round (same source and machine, load average ~9, float32 timed in each process):
  neurons30         20.59M params (-9.4%), 75.6 MB, b1 61.2 -> 49.2 ms, 6.2 -> 6.8 seq/s (1.10x);
                    kept (1221, 1083, 743, 1062, 1315, 1027) of 1536 per layer; dev 0.7477, test
                    0.7705 (+0.44, no recovery); after 1 recovery epoch (research/finetune.py
                    --config.model.init_from=<out>, 2,000 sentences) dev 0.7844, test 0.8138
                    (dense control: -0.34 / -0.61)
  heads30+neurons30 19.50M params (-14.1%), 71.6 MB, b1 92.0 -> 68.9 ms, 8.9 -> 11.5 seq/s
                    (1.29x); the same heads and neurons as heads30 and neurons30; dev 0.7397,
                    test 0.7507 (-1.54); after 1 recovery epoch dev 0.7959, test 0.8160 (dense
                    control: +0.81 / -0.39); HF export: transformers loads it (intermediate_size
                    1536, removed neurons and heads zero), logits within 9e-8
  movement-70%      straight-through (the mask in the forward, dense weights in the optimizer
                    state, masked weights' scores moving and able to return): still one class
                    (dev 0.5092, test 0.4964), from this source and from the pretrained MiniLM
                    (--model=minilm, same 125 steps: dev 0.5092, test 0.4964); magnitude-70%:
                    test 0.7743 from this source, 0.7617 (dev 0.7523) from MiniLM. Cause, at the
                    source's weights with no training (a one-off check; first 200 dev, dense
                    0.720): scores -sum g W from 62 train batches (1 epoch) cutting 24% of every
                    kernel -> 0.495 (one class; a global threshold the same), a random 24% ->
                    0.54, the 24% smallest |W| -> 0.70. The
                    scores are minibatch noise whose spread grows with |W| (std 7.3e-4 for the
                    largest 10% of weights vs 1.6e-4 below the median), so the lowest scores are
                    rich in large weights (mean |W| 0.061 vs 0.046). Sanh et al. score over 10
                    epochs of MNLI; here even a full epoch of scores before the first cut is noise.
"""

import ml_collections

from configs import common, ner, sst2


def get_config(variant: str = ""):
  c = ml_collections.ConfigDict()
  c.method = "int8_w8a8"
  c.kernels = r"encoder/layer_\d+/.*"   # regex over kernel paths: the encoder's six per layer
  c.calibration_batches = 16            # int8_static: training batches that set input scales
  # Head pruning (method 'heads'): the share of all heads removed, the heads every layer keeps,
  # and the dev batches that score them (0: the whole dev split).
  c.heads = ml_collections.ConfigDict(dict(fraction=0.3, min_per_layer=1, max_batches=0))
  # FFN-neuron pruning (method 'neurons'; 'structured': heads and neurons, each by its fraction,
  # scored in one pass over heads.max_batches dev batches): the share of all neurons removed.
  c.neurons = ml_collections.ConfigDict(dict(fraction=0.3, min_per_layer=1))
  # Unstructured pruning during fine-tuning (method 'sparse'): lib/prune.Sparsity; begin/end are
  # fractions of the run's steps; rules choose the pruned kernels (first full match wins).
  c.sparsity = ml_collections.ConfigDict(dict(
      method="magnitude", target=0.7, begin=0.1, end=0.7, every=10, scope="global",
      rules=[(r"encoder/layer_\d+/.*/kernel", "prune")]))
  c.evaluate = True
  c.eval = _eval_config((ner if "ner" in variant.split("+") else sst2).get_config())
  c.speed = ml_collections.ConfigDict(dict(batch=32, seq_len=128, steps=10, latency_steps=40))
  return common.apply_variant(c, variant, {
      "sst2": lambda c: None, "ner": lambda c: None,   # chosen above, before any other variant
      "w8a8": lambda c: setattr(c, "method", "int8_w8a8"),
      "weight_only": lambda c: setattr(c, "method", "int8_weight_only"),
      "static": _static,
      "qat": _qat,
      "heads30": lambda c: _heads(c, 0.3), "heads50": lambda c: _heads(c, 0.5),
      "neurons30": lambda c: _neurons(c, 0.3), "neurons50": lambda c: _neurons(c, 0.5),
      "magnitude": lambda c: _sparse(c, "magnitude", None),
      "movement": lambda c: _sparse(c, "movement", None),
      "prune_magnitude70": lambda c: _sparse(c, "magnitude", 0.7),
      "prune_movement70": lambda c: _sparse(c, "movement", 0.7),
      "s50": lambda c: setattr(c.sparsity, "target", 0.5),
      "s70": lambda c: setattr(c.sparsity, "target", 0.7),
      "s90": lambda c: setattr(c.sparsity, "target", 0.9),
      "quick": _quick,
  })


def _qat(c):
  """Quantisation-aware fine-tuning from --model (2,000 training sentences, 1 epoch), then w8a8."""
  c.method = "qat"
  c.eval.data.max_train_examples = 2000
  c.eval.train.epochs = 1


def _static(c):
  c.method = "int8_static"
  c.eval.data.max_train_examples = 32 * c.calibration_batches   # the calibration batches


def _sparse(c, method, target):
  """Fine-tuning with pruning: 2,000 training sentences, 2 epochs, from --model."""
  c.method, c.sparsity.method = "sparse", method
  if target is not None:
    c.sparsity.target = target
  c.eval.data.max_train_examples = 2000
  c.eval.train.epochs = 2


def _heads(c, fraction):
  """Head pruning; after a neurons variant (heads30+neurons30 either way round) both."""
  c.method = "structured" if c.method in ("neurons", "structured") else "heads"
  c.heads.fraction = fraction


def _neurons(c, fraction):
  """FFN-neuron pruning; after a heads variant both."""
  c.method = "structured" if c.method in ("heads", "structured") else "neurons"
  c.neurons.fraction = fraction


def _eval_config(c):
  # Nothing is trained: a few training examples keep setup from tokenising the training set.
  c.data.max_train_examples = 32
  return c


def _quick(c):
  c.eval.data.max_eval_examples = 200
  c.speed.steps = 4
  c.speed.latency_steps = 10
