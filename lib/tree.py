"""Parameter-tree paths: the '/'-joined path of a leaf, and flattening a tree to {path: leaf} and
back (the one place; lib/peft, sharding, optim, checkpoint and hf all use it)."""

import jax


def path_str(keypath) -> str:
  """'encoder/layer_0/attention/query/kernel' for a jax key path (dict keys, attributes and
  sequence indices alike)."""
  parts = []
  for k in keypath:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    else:
      parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
  return "/".join(parts)


def flatten(tree, is_leaf=None) -> dict:
  """{path string: leaf} in tree order (None nodes, e.g. optax's EmptyState, have no leaves)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return {path_str(kp): leaf for kp, leaf in flat}


def unflatten(flat: dict) -> dict:
  """{'a/b/c': leaf} -> nested dicts (the inverse of `flatten` for trees of dicts)."""
  tree: dict = {}
  for path, leaf in flat.items():
    node = tree
    *parents, name = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[name] = leaf
  return tree
