"""The intervention seat: edit a model's residual stream, attention and MLP outputs by interception.

Nothing in lib/models changes: `flax.linen.intercept_methods` sees every module call, and the
interceptor here recognises the house's building blocks by class (`layers.Block`, `Attention`,
`Mlp`, the `word` embedding) and their layer by the `layer_<i>` name in the module path. Sites:

  "embed"  the word embeddings (B, T, D) before positions are added (ROME's noise goes here)
  "resid"  the residual stream: i < L is the input of layer i (0 = the embedding output), i = L
           the last layer's output (GPT-2: before `final_ln`)
  "attn"   layer i's attention output (B, T, D), before dropout/adapter and the residual sum
  "mlp"    layer i's MLP output (B, T, D), likewise

`edit(site, layer, value) -> value` is called at each site during tracing (so inside jit it
sees tracers). With `start > 0`, layers below `start` are not computed at all: their output is
`start_state` (the residual input of layer `start`), which is how a patching sweep reuses the
shared prefix of a cached run.
"""

import contextlib
import re
from typing import Callable, Optional

import flax.linen as nn
import jax.numpy as jnp

from lib.models import layers

SITES = ("embed", "resid", "attn", "mlp")
Edit = Callable[[str, int, object], object]
_LAYER = re.compile(r"layer_(\d+)")


def layer_index(module: nn.Module) -> int:
  """The i of the innermost `layer_<i>` in the module's path.

  Raises:
    ValueError: the module sits in no `layer_<i>` (not one of run_layers' blocks).
  """
  for name in reversed(module.path):
    m = _LAYER.fullmatch(name)
    if m:
      return int(m.group(1))
  raise ValueError(f"module {'/'.join(module.path)} is not inside a layer_<i> block")


def _block(next_fun, args, kwargs, module, edit, start, start_state):
  """A Block call: skipped below `start`, else its input and (last layer) output edited."""
  i, last = layer_index(module), module.args.num_layers - 1
  if i < start:
    y = start_state
    return (edit("resid", last + 1, y) if i == last else y), None
  x = edit("resid", i, args[0])
  y, probs = next_fun(x, *args[1:], **kwargs)
  if i == last:
    y = edit("resid", last + 1, y)
  return y, probs


def interceptor(edit: Optional[Edit] = None, start: int = 0, start_state=None):
  """The `nn.intercept_methods` function applying `edit` and the prefix skip (see module doc)."""
  edit = edit or (lambda site, i, x: x)
  if start > 0 and start_state is None:
    raise ValueError(f"start={start} needs the start_state (the residual input of layer {start})")

  def fn(next_fun, args, kwargs, ctx):
    m = ctx.module
    if ctx.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if isinstance(m, layers.Block):
      return _block(next_fun, args, kwargs, m, edit, start, start_state)
    if isinstance(m, layers.Attention):
      out, probs = next_fun(*args, **kwargs)
      return edit("attn", layer_index(m), out), probs
    if isinstance(m, layers.Mlp):
      return edit("mlp", layer_index(m), next_fun(*args, **kwargs))
    if isinstance(m, nn.Embed) and m.name == "word":
      return edit("embed", 0, next_fun(*args, **kwargs))
    return next_fun(*args, **kwargs)

  return fn


@contextlib.contextmanager
def intervene(edit: Optional[Edit] = None, start: int = 0, start_state=None):
  """Context in which model calls are edited (see `interceptor`); enter it inside the traced fn."""
  with nn.intercept_methods(interceptor(edit, start, start_state)):
    yield


def apply(module, params, batch: dict, edit: Optional[Edit] = None, start: int = 0,
          start_state=None):
  """module.apply on a batch (input_ids, input_mask[, token_type_ids]) under `intervene`.

  Returns the model's (outputs, intermediates); with `start > 0` the intermediates' hidden
  states below `start` are not the model's (those layers were not run).
  """
  if getattr(module.args, "remat", "none") != "none":
    raise ValueError("interventions need ModelArgs.remat='none' (nn.remat hides the Block class)")
  kw = {k: batch[k] for k in ("input_mask", "token_type_ids") if k in batch}
  with intervene(edit, start, start_state):
    return module.apply({"params": params}, batch["input_ids"], deterministic=True, **kw)


def record(module, params, batch: dict, edit: Optional[Edit] = None) -> tuple:
  """One run storing every site's value (after `edit`).

  Returns:
    (outputs, acts): acts["resid"] (L+1, B, T, D), acts["attn"] and acts["mlp"] (L, B, T, D),
    acts["embed"] (B, T, D).
  """
  store = {s: {} for s in SITES}
  base = edit or (lambda site, i, x: x)

  def keep(site, i, x):
    x = base(site, i, x)
    store[site][i] = x
    return x

  outputs, _ = apply(module, params, batch, keep)
  acts = {s: jnp.stack([v[i] for i in sorted(v)]) for s, v in store.items() if s != "embed"}
  acts["embed"] = store["embed"][0]
  return outputs, acts
