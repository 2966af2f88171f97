"""Device mesh, shardings and multi-host helpers for data parallelism.

One code path for one CPU, one GPU, a multi-GPU host or a TPU pod: a 1-D
`Mesh` with a `data` axis over every device of every process; the batch is
sharded along it, parameters and optimizer state are replicated. Several
processes (hosts) join JAX's multi-controller runtime first with
`initialize_distributed`.
"""

import contextlib
import glob
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import flags, logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fdiff_jax.errors import UserError

DATA_AXIS = 'data'
BARRIER_TIMEOUT_S = 3600  # Process 0 may be preparing a whole dataset meanwhile.


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
      f'{jax.process_count()} process(es); set config.train.batch_size to a multiple of {n}'
    )


def global_batch(local_batch, mesh):
  """This process's numpy batch -> global jax.Arrays sharded along `data`."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def is_main_process():
  return jax.process_index() == 0


def _setting(value, name, parse=str):
  """`value`, else environment variable FDIFF_<NAME>, parsed; None if neither is set."""
  text = os.environ.get(f'FDIFF_{name.upper()}') if value is None else value
  try:
    return None if text is None else parse(text)
  except ValueError:
    raise UserError(f'cannot parse --{name} / FDIFF_{name.upper()} {text!r}') from None


def _device_ids(text):
  """'0,1,2,3' (or a sequence) -> [0, 1, 2, 3]."""
  return [int(i) for i in (text.split(',') if isinstance(text, str) else text)]


def _on_cloud_tpu_vm():
  """A Google TPU chip (PCI vendor 0x1ae0) is attached: the check JAX itself makes."""
  for path in glob.glob('/sys/bus/pci/devices/*/vendor'):
    with open(path) as f:
      if f.read().strip() == '0x1ae0':
        return True
  return False


def _managed_cluster():
  """A multi-task SLURM step or a Cloud TPU VM, where JAX finds every setting itself."""
  return int(os.environ.get('SLURM_NTASKS', '1')) > 1 or _on_cloud_tpu_vm()


def _explicit_settings(coordinator_address, num_processes, process_id):
  """The three settings from arguments or FDIFF_* variables: all of them, or None if none is set."""
  settings = {
    'coordinator_address': _setting(coordinator_address, 'coordinator_address'),
    'num_processes': _setting(num_processes, 'num_processes', int),
    'process_id': _setting(process_id, 'process_id', int),
  }
  given = [name for name, value in settings.items() if value is not None]
  if not given:
    return None
  if len(given) < len(settings):
    raise UserError(
      'multi-process training needs all of coordinator_address, num_processes '
      f'and process_id (flags or FDIFF_* variables); got only {", ".join(given)}'
    )
  if not 0 <= settings['process_id'] < settings['num_processes']:
    raise UserError(
      f'process_id {settings["process_id"]} is not in '
      f'[0, num_processes {settings["num_processes"]})'
    )
  return settings


def initialize_distributed(
  coordinator_address=None, num_processes=None, process_id=None, local_device_ids=None
):
  """Joins JAX's multi-controller runtime when this is one of several processes.

  Explicit settings (arguments, else FDIFF_COORDINATOR_ADDRESS,
  FDIFF_NUM_PROCESSES, FDIFF_PROCESS_ID) work on any cluster; without them
  JAX detects its cluster itself under a multi-task SLURM step or on a Cloud
  TPU VM, and a lone process does nothing. `local_device_ids` (or
  FDIFF_LOCAL_DEVICE_IDS='0,1') limits the devices this process uses. Call it
  before anything touches a JAX device. Returns whether it initialized.
  """
  explicit = _explicit_settings(coordinator_address, num_processes, process_id)
  if explicit is None and not _managed_cluster():
    return False
  device_ids = _setting(local_device_ids, 'local_device_ids', _device_ids)
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # For CPU processes.
  try:
    jax.distributed.initialize(**(explicit or {}), local_device_ids=device_ids)
  except jax.errors.JaxRuntimeError as e:
    reason = (str(e).strip() or type(e).__name__).splitlines()[0]
    raise UserError(
      f'could not join the JAX distributed runtime ({reason}); check that every '
      'process got the same coordinator address and process count'
    ) from None
  # Orbax's own barriers (checkpoint save, restore, directory creation) then use
  # the coordination service, with timeouts, instead of device collectives:
  # those give up after 30 s on CPU (gloo) when one process is late.
  flags.FLAGS['experimental_orbax_use_distributed_barrier'].parse('true')
  logging.info(
    'Process %d of %d: %d local of %d devices',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return True


def barrier(name, timeout_s=BARRIER_TIMEOUT_S):
  """Waits until every process got here (a no-op for one process).

  A coordination-service barrier, not a device collective: the wait may be
  long (gloo gives up connecting after 30 s).
  """
  ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)


def compile_together(name, fn, *args):
  """Compiles jitted `fn` for `args`, then waits until every process has (no-op for one).

  With CPU (gloo) collectives, a process that reaches a program's first
  collective over 30 s after another makes it fail, and compile times differ a
  lot between busy hosts; so the first call of such a program starts together.
  The compiled program is cached: the call that follows does not compile again.
  """
  if jax.process_count() > 1:
    fn.lower(*args).compile()
    barrier(name)


@contextlib.contextmanager
def main_process_first(name):
  """Runs the block on process 0, then on all others: e.g. preparing a dataset on a shared disk.

  All processes leave it together, so what follows starts in step: a process
  still in the block cannot see files that process 0 wrote after it (e.g. a
  checkpoint folder) and take another path.
  """
  if not is_main_process():
    barrier(name)
  try:
    yield
  finally:
    if is_main_process():
      barrier(name)
    barrier(f'{name}_done')
