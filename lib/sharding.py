"""Device mesh, logical-axis -> mesh-axis rules, shardings of params, optimizer state and batches."""

import math
from typing import Optional, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lib import tree

MESH_AXES = ("data", "fsdp", "tensor")
# Logical axis (the models' vocabulary) -> mesh axis, a tuple of mesh axes, or None (replicated).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("length", None),
)


def default_mesh_config() -> ml_collections.ConfigDict:
  """The `mesh` sub-config.

  Fields:
    data, fsdp, tensor: mesh axis sizes within a slice (ICI: one host's GPUs, one TPU slice).
      One of them may be -1: it takes the remaining devices. `data` replicates parameters,
      `fsdp` shards parameters and optimizer state over `embed` (ZeRO-3 style) while also
      splitting the batch, `tensor` shards heads/mlp/vocab (Megatron style).
    dcn_data, dcn_fsdp, dcn_tensor: sizes across slices / hosts (DCN, the slow network); their
      product must be the number of slices (TPU multi-slice) or of processes (GPU hosts).
      The mesh axis size is the product, e.g. data = dcn_data * data.
  """
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1,
                                        dcn_data=1, dcn_fsdp=1, dcn_tensor=1))


def _resolve(shape: Sequence[int], n: int, what: str) -> list:
  shape = [int(s) for s in shape]
  if shape.count(-1) > 1:
    raise ValueError(f"mesh {what} {shape}: at most one axis may be -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if n % known:
      raise ValueError(f"mesh {what} {shape}: {n} devices are not divisible by {known}")
    shape[shape.index(-1)] = n // known
  if math.prod(shape) != n:
    raise ValueError(f"mesh {what} {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} "
                     f"devices, have {n}")
  return shape


def _granules(devices, n: int) -> list:
  """Devices grouped by slice (TPU multi-slice) if there are `n` slices, else by process (GPU
  hosts, CPU tests), each group in device order."""
  for key in ("slice_index", "process_index"):
    groups: dict = {}
    for d in devices:
      groups.setdefault(getattr(d, key, 0), []).append(d)
    if len(groups) == n:
      break
  return [groups[k] for k in sorted(groups)]


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """Mesh with axes ('data', 'fsdp', 'tensor') from the `mesh` sub-config.

  Args:
    mesh_cfg: see `default_mesh_config`.
    devices: defaults to all devices of all processes.
  """
  devices = list(jax.devices() if devices is None else devices)
  dcn = [int(mesh_cfg.get(f"dcn_{a}", 1)) for a in MESH_AXES]
  ici_n, rem = divmod(len(devices), math.prod(dcn))
  if rem:
    raise ValueError(f"mesh dcn shape {dcn} does not divide {len(devices)} devices")
  ici = _resolve([mesh_cfg.get(a, 1) for a in MESH_AXES], ici_n, "shape")
  if math.prod(dcn) == 1:
    arr = mesh_utils.create_device_mesh(ici, devices)
  else:
    granules = _granules(devices, math.prod(dcn))
    if len(granules) != math.prod(dcn):
      raise ValueError(f"mesh dcn shape {dcn} needs {math.prod(dcn)} slices/processes, "
                       f"found {len(granules)}")
    blocks = np.empty(dcn, dtype=object)
    for i, idx in enumerate(np.ndindex(*dcn)):
      blocks[idx] = mesh_utils.create_device_mesh(ici, granules[i])
    arr = np.block(blocks.tolist())
  mesh = Mesh(arr, MESH_AXES)
  logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), arr.size,
               jax.process_count())
  return mesh


def _rules_dict(rules) -> dict:
  out = {}
  for rule in rules:
    logical, axes = rule
    if axes is not None:
      axes = (axes,) if isinstance(axes, str) else tuple(axes)
      bad = [a for a in axes if a not in MESH_AXES]
      if bad:
        raise ValueError(f"sharding rule {tuple(rule)!r}: unknown mesh axes {bad}; "
                         f"valid: {MESH_AXES}")
    out.setdefault(logical, axes)
  return out


def logical_to_mesh(spec: P, rules, shape=None, mesh: Optional[Mesh] = None, path: str = "") -> P:
  """PartitionSpec of logical names -> PartitionSpec of mesh axes.

  A mesh axis is used at most once per array (first dimension wins). With `shape` and `mesh`, a
  dimension that the mesh axes do not divide evenly is replicated (logged).

  Raises:
    ValueError: a logical name without a rule (naming `path`).
  """
  table, used, out = _rules_dict(rules), set(), []
  for i, name in enumerate(spec):
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise ValueError(f"{path}: logical axis {name!r} has no sharding rule; rules: {list(table)}")
    axes = tuple(a for a in (table[name] or ()) if a not in used)
    if shape is not None and mesh is not None and shape[i] % math.prod(mesh.shape[a] for a in axes):
      logging.warning("%s: dim %d (%s, size %d) not divisible by mesh axes %s; replicated",
                      path, i, name, shape[i], axes)
      axes = ()
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def param_shardings(abstract_params, logical_specs, mesh: Mesh, rules):
  """NamedSharding tree for parameters from their logical PartitionSpecs."""
  def one(kp, x, spec):
    return NamedSharding(mesh, logical_to_mesh(spec, rules, x.shape, mesh, tree.path_str(kp)))
  return jax.tree_util.tree_map_with_path(one, abstract_params, logical_specs)


def opt_state_shardings(abstract_opt_state, abstract_params, params_shardings, mesh: Mesh):
  """Shardings for an optimizer state: a leaf whose key path ends with a parameter's path and has
  its shape (Adam's mu/nu, ...) gets that parameter's sharding; the rest (counts) is replicated."""
  shapes = {k: tuple(x.shape) for k, x in tree.flatten(abstract_params).items()}
  by_path = tree.flatten(params_shardings)

  def one(kp, x):
    names = [tree.path_str([k]) for k in kp]
    for i in range(len(names)):
      path = "/".join(names[i:])
      if path in by_path and shapes[path] == tuple(x.shape):
        return by_path[path]
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Sharding of batch arrays: the leading axis over the mesh axes of logical 'batch'."""
  return NamedSharding(mesh, logical_to_mesh(P("batch"), rules))


def process_batch_range(sharding: NamedSharding, global_batch_size: int) -> tuple[int, int]:
  """Rows [start, stop) of the global batch that this process must load."""
  idx = sharding.addressable_devices_indices_map((global_batch_size,)).values()
  rows = [(s[0].start or 0, global_batch_size if s[0].stop is None else s[0].stop) for s in idx]
  start, stop = min(r[0] for r in rows), max(r[1] for r in rows)
  return start, stop


def shard_batch(batch: dict, sharding: NamedSharding) -> dict:
  """Process-local numpy batch (this process's rows, see `process_batch_range`) -> global arrays.

  Raises:
    ValueError: an entry without a leading batch axis (named).
  """
  def place(kp, x):
    x = np.asarray(x)
    if x.ndim == 0:
      raise ValueError(f"batch[{tree.path_str(kp)!r}] is a scalar; every batch entry needs a "
                       "leading batch axis")
    return jax.make_array_from_process_local_data(sharding, x)
  return jax.tree_util.tree_map_with_path(place, batch)


def _bytes_per_device(x, sharding) -> int:
  shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
  return int(np.prod(shape)) * np.dtype(x.dtype).itemsize


def explain_sharding(params, shardings=None, opt_state=None, opt_shardings=None) -> str:
  """Table: one row per parameter (path, shape, PartitionSpec, bytes per device), then totals.

  Args:
    params: parameter tree (arrays or ShapeDtypeStructs; with `.sharding` if `shardings` is None).
    shardings: NamedSharding tree for `params`.
    opt_state, opt_shardings: optional optimizer state (and shardings) for a totals row.
  """
  shardings = shardings if shardings is not None else jax.tree.map(lambda x: x.sharding, params)
  flat = tree.flatten(params)
  specs = tree.flatten(shardings)
  width = max([len(p) for p in flat] + [4])
  mesh = getattr(next(iter(specs.values()), None), "mesh", None)
  rows = [f"mesh {dict(mesh.shape) if mesh is not None else None} "
          f"({mesh.size if mesh is not None else 1} devices)",
          f"{'path':<{width}}  {'shape':<18} {'spec':<32} {'bytes/device':>14}"]
  total = per_dev = 0
  for path, x in flat.items():
    b = _bytes_per_device(x, specs[path])
    per_dev += b
    total += int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    spec = getattr(specs[path], "spec", "-")
    rows.append(f"{path:<{width}}  {str(tuple(x.shape)):<18} {str(spec):<32} {b:>14,}")
  rows.append(f"params: {len(flat)} arrays, {total:,} bytes total, {per_dev:,} bytes/device")
  if opt_state is not None:
    leaves = jax.tree.leaves(opt_state)
    osh = (jax.tree.leaves(opt_shardings) if opt_shardings is not None
           else [x.sharding for x in leaves])
    ob = sum(_bytes_per_device(x, s) for x, s in zip(leaves, osh))
    rows.append(f"optimizer state: {len(leaves)} arrays, {ob:,} bytes/device; "
                f"params + optimizer: {per_dev + ob:,} bytes/device")
  return "\n".join(rows)
