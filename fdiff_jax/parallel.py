"""Device mesh, shardings and multi-host helpers for data parallelism.

One code path for one CPU, one GPU, a multi-GPU host or a TPU pod: a 1-D
`Mesh` with a `data` axis over every device of every process; the batch is
sharded along it, parameters and optimizer state are replicated.
"""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fdiff_jax.errors import UserError

DATA_AXIS = 'data'


def create_mesh(devices=None):
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh):
  return NamedSharding(mesh, P(DATA_AXIS))


def check_global_batch(global_batch, mesh):
  """The global batch must split evenly over devices and processes."""
  n = mesh.devices.size
  if global_batch % n or global_batch % jax.process_count():
    raise UserError(
        f'global batch size {global_batch} does not divide over {n} devices in '
        f'{jax.process_count()} process(es); set --config.train.batch_size to a multiple of {n}')


def global_batch(local_batch, mesh):
  """This process's numpy batch -> global jax.Arrays sharded along `data`."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def is_main_process():
  return jax.process_index() == 0
