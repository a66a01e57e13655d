"""Parameter-efficient fine-tuning as path rules over the parameter tree.

One spec (the config's `peft` section): ordered (regex, method) rules over '/'-joined parameter
paths, methods freeze | train/full | bitfit | lora(rank, alpha, dropout) | adalora(init_rank,
target_rank, ...), and model-level options adapter(bottleneck) | prefix(length, reparam_hidden) |
prompt(length). From it:
  spec.py     parsing; `configure(args, spec)`: the ModelArgs fields that make lib/models create
              the extra parameters (with logical axes, hence shardings);
  labels.py   the label tree for optax.multi_transform (frozen = no optimizer state);
  params.py   PEFT params on top of base weights, merge/unmerge, adapter-only save/load, counts;
  adalora.py  AdaLoRA's importance, budget schedule and orthogonality regulariser (optax wrapper);
  hf_export.py  LoRA adapters in the Hugging Face PEFT format.
"""

from lib.peft.adalora import adalora_ranks, rank_metrics, with_rank_metrics, wrap_optimizer
from lib.peft.labels import (FREEZE, FULL_FINETUNE, LORA_LEAVES, flatten_paths, is_trainable,
                             label_params, label_table, merge_trainable, path_str, peft_kind,
                             split_trainable)
from lib.peft.params import (add_params, load_adapter, merge, save_adapter, trainable_count,
                             unflatten_paths, unmerge)
from lib.peft.spec import (METHODS, OPTIONS, Method, Spec, base_args, configure, parse_method,
                           parse_option, parse_spec, spec_from_config)
