"""The PEFT spec: methods named in the ordered path rules, model-level options, and ModelArgs."""

import ast
import dataclasses
import re
from typing import NamedTuple, Optional, Sequence

from lib import errors
from lib.models.layers import LoraArgs, ModelArgs

# Methods of a (regex, method) rule, with their keyword defaults in positional order.
METHODS = {
    "freeze": {},                   # frozen: no gradient, no optimizer state
    "train": {}, "full": {},        # trainable as a whole
    "bitfit": {},                   # only leaves named 'bias' trainable, the rest frozen
    "lora": dict(rank=8, alpha=16.0, dropout=0.0),
    # AdaLoRA: t_init/t_final are fractions of the run (budget warmup and final fine-tuning);
    # delta_t is the number of steps between budget reallocations.
    "adalora": dict(init_rank=12, target_rank=8, alpha=16.0, dropout=0.0, t_init=0.1,
                    t_final=0.2, delta_t=10, beta1=0.85, beta2=0.85, orth_reg=0.5),
}
# Model-level options (the `options` list of the config's `peft` section).
OPTIONS = {
    "adapter": dict(bottleneck=64),
    "prefix": dict(length=10, reparam_hidden=0),
    "prompt": dict(length=20),
}
LORA_METHODS = ("lora", "adalora")


class Method(NamedTuple):
  """A parsed method: `kind` (a METHODS/OPTIONS name), its optimizer `label`, its arguments.

  A rule label that is not a method name (e.g. 'head') is kind 'train' with that label: an
  optimizer group of its own (for `optim.lr_mult`).
  """
  kind: str
  label: str
  kwargs: tuple = ()   # ((name, value), ...) in signature order

  def __getattr__(self, name):
    for k, v in self.kwargs:
      if k == name:
        return v
    raise AttributeError(f"{self.kind} has no argument {name!r}")


def _literal(node, where: str):
  try:
    return ast.literal_eval(node)
  except ValueError as e:
    raise errors.ConfigError(f"{where}: arguments must be literals, got {ast.unparse(node)!r}") from e


def _call(text: str, where: str) -> tuple:
  """'name(1, b=2)' -> ('name', [1], {'b': 2})."""
  try:
    node = ast.parse(text.strip(), mode="eval").body
  except SyntaxError as e:
    raise errors.ConfigError(f"{where}: {text!r} is not of the form name(arg, key=value, ...)") from e
  if isinstance(node, ast.Name):
    return node.id, [], {}
  if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
    raise errors.ConfigError(f"{where}: {text!r} is not of the form name(arg, key=value, ...)")
  return (node.func.id, [_literal(a, where) for a in node.args],
          {k.arg: _literal(k.value, where) for k in node.keywords})


def _bind(name: str, defaults: dict, args: list, kwargs: dict, where: str) -> tuple:
  """Positional and keyword arguments over `defaults`, type-checked against the defaults."""
  if len(args) > len(defaults):
    raise errors.ConfigError(f"{where}: {name} takes at most {len(defaults)} arguments "
                     f"({', '.join(defaults) or 'none'}), got {len(args)}")
  values = dict(defaults)
  values.update(zip(defaults, args))
  for k, v in kwargs.items():
    if k not in defaults:
      raise errors.ConfigError(f"{where}: {name} has no argument {k!r}; valid: {list(defaults)}")
    if k in list(defaults)[:len(args)]:
      raise errors.ConfigError(f"{where}: {name} argument {k!r} given twice")
    values[k] = v
  for k, v in values.items():
    want = type(defaults[k])
    if want is float and isinstance(v, int) and not isinstance(v, bool):
      values[k] = float(v)
    elif not isinstance(v, want) or isinstance(v, bool):
      raise errors.ConfigError(f"{where}: {name} argument {k}={v!r} must be a {want.__name__}")
  return tuple(values.items())


def parse_method(text: str, where: str = "peft rule") -> Method:
  """A rule's method: 'freeze', 'train', 'full', 'bitfit', 'lora(8, 16, 0.1)', 'adalora(...)',
  or any other plain name (a trainable optimizer group of that name).

  Raises:
    ValueError: an unknown method called with arguments, bad arguments or values (naming `where`).
  """
  if not isinstance(text, str):
    raise errors.ConfigError(f"{where}: the method must be a string, got {text!r}")
  if "(" not in text and text.strip() not in METHODS:
    return Method("train", text)
  name, args, kwargs = _call(text, where)
  if name not in METHODS:
    raise errors.ConfigError(f"{where}: unknown method {name!r}; valid: {sorted(METHODS)} (or a plain "
                     "optimizer group name without arguments)")
  m = Method("train" if name == "full" else name, name,
             _bind(name, METHODS[name], args, kwargs, where))
  _validate(m, where)
  return m


def parse_option(text: str, where: str = "peft option") -> Method:
  """A model-level option: 'adapter(64)', 'prefix(10, 512)' or 'prompt(20)'."""
  name, args, kwargs = _call(str(text), where)
  if name not in OPTIONS:
    raise errors.ConfigError(f"{where}: unknown option {name!r}; valid: {sorted(OPTIONS)}")
  m = Method(name, name, _bind(name, OPTIONS[name], args, kwargs, where))
  _validate(m, where)
  return m


_CHECKS = {
    "lora": [("rank", lambda m: m.rank >= 1), ("alpha", lambda m: m.alpha > 0),
             ("dropout", lambda m: 0 <= m.dropout < 1)],
    "adalora": [("target_rank", lambda m: 1 <= m.target_rank <= m.init_rank),
                ("alpha", lambda m: m.alpha > 0), ("dropout", lambda m: 0 <= m.dropout < 1),
                ("t_init", lambda m: 0 <= m.t_init and 0 < m.t_final and
                 m.t_init + m.t_final < 1), ("delta_t", lambda m: m.delta_t >= 1),
                ("beta1", lambda m: 0 <= m.beta1 < 1), ("beta2", lambda m: 0 <= m.beta2 < 1),
                ("orth_reg", lambda m: m.orth_reg >= 0)],
    "adapter": [("bottleneck", lambda m: m.bottleneck >= 1)],
    "prefix": [("length", lambda m: m.length >= 1),
               ("reparam_hidden", lambda m: m.reparam_hidden >= 0)],
    "prompt": [("length", lambda m: m.length >= 1)],
}
_EXPECT = {"rank": ">= 1", "alpha": "> 0", "dropout": "in [0, 1)",
           "target_rank": "in [1, init_rank]", "t_init": ">= 0 with 0 < t_final, "
           "t_init + t_final < 1", "delta_t": ">= 1", "beta1": "in [0, 1)", "beta2": "in [0, 1)",
           "orth_reg": ">= 0", "bottleneck": ">= 1", "length": ">= 1", "reparam_hidden": ">= 0"}


def _validate(m: Method, where: str) -> None:
  for arg, ok in _CHECKS.get(m.kind, []):
    if not ok(m):
      raise errors.ConfigError(f"{where}: {m.kind} needs {arg} {_EXPECT[arg]}; got {dict(m.kwargs)}")


@dataclasses.dataclass(frozen=True)
class Spec:
  """A parsed `peft` section: ordered (regex, Method) rules and model-level options."""
  rules: tuple                        # ((regex string, Method), ...)
  options: tuple = ()                 # (Method, ...) of kind adapter / prefix / prompt

  def option(self, kind: str) -> Optional[Method]:
    return next((o for o in self.options if o.kind == kind), None)

  @property
  def adalora(self) -> Optional[Method]:
    """The AdaLoRA method (one per spec: its rank budget is global), or None."""
    return next((m for _, m in self.rules if m.kind == "adalora"), None)


def parse_spec(rules: Sequence[Sequence[str]], options: Sequence[str] = ()) -> Spec:
  """Spec from the config's `peft.rules` ([regex, method] pairs) and `peft.options`.

  Raises:
    ValueError: malformed rules, bad regexes or methods, repeated options, or several different
      AdaLoRA methods (their rank budget is shared by all adapted matrices).
  """
  parsed = []
  for i, rule in enumerate(rules):
    if len(rule) != 2 or not all(isinstance(r, str) for r in rule):
      raise errors.ConfigError(f"peft rule #{i} {rule!r}: expected a (regex, method) pair of strings")
    try:
      re.compile(rule[0])
    except re.error as e:
      raise errors.ConfigError(f"peft rule #{i} {tuple(rule)!r}: bad regex: {e}") from e
    parsed.append((rule[0], parse_method(rule[1], f"peft rule #{i} {tuple(rule)!r}")))
  if not parsed:
    raise errors.ConfigError("peft rules are empty; full fine-tuning is [('.*', 'train')]")
  ada = {m for _, m in parsed if m.kind == "adalora"}
  if len(ada) > 1:
    raise errors.ConfigError(f"peft rules: one AdaLoRA method per spec (its budget is global), got "
                     f"{sorted(m.kwargs for m in ada)}")
  opts = tuple(parse_option(o, f"peft option #{i} {o!r}") for i, o in enumerate(options))
  kinds = [o.kind for o in opts]
  if len(set(kinds)) != len(kinds):
    raise errors.ConfigError(f"peft options: each option at most once, got {list(options)}")
  return Spec(tuple(parsed), opts)


def spec_from_config(peft_cfg) -> Spec:
  """Spec of a config's `peft` section (`rules`, optional `options`)."""
  return parse_spec([tuple(r) for r in peft_cfg.rules], list(peft_cfg.get("options", ()) or ()))


def lora_args(m: Method) -> Optional[LoraArgs]:
  if m.kind == "lora":
    return LoraArgs(m.rank, m.alpha, m.dropout, False)
  if m.kind == "adalora":
    return LoraArgs(m.init_rank, m.alpha, m.dropout, True)
  return None


def configure(args: ModelArgs, spec: Spec) -> ModelArgs:
  """`args` with the model-side PEFT fields of `spec` (a spec of labels only changes nothing)."""
  rules = [(rx, lora_args(m)) for rx, m in spec.rules]
  while rules and rules[-1][1] is None:   # nothing after the last LoRA rule changes a match
    rules.pop()
  adapter, prefix, prompt = (spec.option(k) for k in ("adapter", "prefix", "prompt"))
  return dataclasses.replace(
      args, lora=tuple(rules), adapter_dim=adapter.bottleneck if adapter else 0,
      prefix_len=prefix.length if prefix else 0,
      prefix_hidden=prefix.reparam_hidden if prefix else 0,
      prompt_len=prompt.length if prompt else 0)


def base_args(args: ModelArgs) -> ModelArgs:
  """The plain model's args: every PEFT field off."""
  return dataclasses.replace(args, lora=(), adapter_dim=0, prefix_len=0, prefix_hidden=0,
                             prompt_len=0)

