"""Ahead-of-time plans for TPU slices and GPU hosts that are not here: `fdiff plan`.

Compiles the real jitted, sharded train step (`train.jit_train_step` over a
`parallel` mesh of the target's devices, with the state of
`checkpoints.abstract_state`) and one guided denoiser evaluation of the sampler
(`Sampler.guided_output`, what every solver step calls) for a target topology
with `.lower(ShapeDtypeStruct...).compile()`, and reports per chip: FLOPs,
argument / output / temporary / peak memory against the chip's HBM, the largest
batch that compiles within it, and a compute-bound estimate of step time and
images/s at a stated fraction of the chip's published peak.

TPU targets compile with libtpu; GPU targets with the CUDA PJRT plugin and a
target description written here from NVIDIA's published specs (`GPU_SPECS`).
Both run on a CPU-only machine (`pip install -e ".[plan]"`). XLA's GPU cost
analysis returns nothing, so GPU FLOPs are counted from the optimised HLO by
`flop_count.hlo_flops`, which also counts the GEMMs and convolutions XLA hands to cuBLAS
and cuDNN as custom calls. How the estimates are made: docs/performance.md.
"""

import dataclasses
import functools
import json
import os
import re
import time

from fdiff_jax.errors import UserError
from fdiff_jax.flop_count import hlo_flops

GIB = 2**30
DEFAULT_UTILISATION = 0.4
DEFAULT_SEARCH_COMPILES = 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published figures of one accelerator chip (per chip, dense, no sparsity)."""

  name: str
  hbm_bytes: int
  bf16_tflops: float
  f32_tflops: float  # What float32 matmuls get under JAX's default precision.
  hbm_gb_per_s: float
  usable: float = 1.0  # Fraction of HBM a JAX program may use by default.


# TPU: one bf16 pass per float32 matmul at JAX's default precision, so float32 runs at the bf16 peak.
# GPU: float32 matmuls use TF32 tensor cores at default precision (dense TF32 peak), and JAX
# preallocates 75% of GPU memory (XLA_PYTHON_CLIENT_MEM_FRACTION), the usable part.
CHIPS = {
  # https://cloud.google.com/tpu/docs/v4: 32 GiB HBM2, 275 TFLOP/s bf16, 1228 GB/s.
  'v4': Chip('TPU v4', 32 * GIB, 275.0, 275.0, 1228.0),
  # https://cloud.google.com/tpu/docs/v5e: 16 GiB HBM2, 197 TFLOP/s bf16, 819 GB/s.
  'v5e': Chip('TPU v5e', 16 * GIB, 197.0, 197.0, 819.0),
  # https://cloud.google.com/tpu/docs/v5p: 95 GiB HBM2e, 459 TFLOP/s bf16, 2765 GB/s.
  'v5p': Chip('TPU v5p', 95 * GIB, 459.0, 459.0, 2765.0),
  # https://cloud.google.com/tpu/docs/v6e: 32 GiB HBM, 918 TFLOP/s bf16, 1640 GB/s.
  'v6e': Chip('TPU v6e', 32 * GIB, 918.0, 918.0, 1640.0),
  # NVIDIA H100 datasheet (SXM5): 80 GB HBM3, 989 TFLOP/s bf16 and 494.5 TF32 dense, 3.35 TB/s.
  'h100': Chip('H100 SXM 80GB', 80 * 10**9, 989.0, 494.5, 3350.0, usable=0.75),
  # NVIDIA A100 datasheet (SXM4 80GB): 80 GB HBM2e, 312 TFLOP/s bf16, 156 TF32, 2039 GB/s.
  'a100': Chip('A100 SXM 80GB', 80 * 10**9, 312.0, 156.0, 2039.0, usable=0.75),
}

# Architecture figures XLA:GPU needs to compile for a GPU it cannot see, from NVIDIA's
# published specs (CUDA C Programming Guide, compute capability tables; H100 and A100
# whitepapers): SMs, clock, L2, shared memory per SM and per block (opt-in).
GPU_SPECS = {
  'h100': dict(
    sm=132,
    cc=(9, 0),
    clock_ghz=1.98,
    l2_bytes=50 * 2**20,
    smem_per_sm=228 * 1024,
    smem_optin=227 * 1024,
    fp32_per_sm=128,
    bandwidth=3_350_000_000_000,
  ),
  'a100': dict(
    sm=108,
    cc=(8, 0),
    clock_ghz=1.41,
    l2_bytes=40 * 2**20,
    smem_per_sm=164 * 1024,
    smem_optin=163 * 1024,
    fp32_per_sm=64,
    bandwidth=2_039_000_000_000,
  ),
}


def gpu_target_config(gpu: str) -> str:
  """The GpuTargetConfigProto textproto XLA:GPU compiles against, for a GPU in `GPU_SPECS`."""
  s, chip = GPU_SPECS[gpu], CHIPS[gpu]
  major, minor = s['cc']
  fields = {
    'threads_per_block_limit': 1024,
    'threads_per_warp': 32,
    'shared_memory_per_block': 48 * 1024,
    'shared_memory_per_core': s['smem_per_sm'],
    'threads_per_core_limit': 2048,
    'core_count': s['sm'],
    'fpus_per_core': s['fp32_per_sm'],
    'block_dim_limit_x': 2**31 - 1,
    'block_dim_limit_y': 65535,
    'block_dim_limit_z': 65535,
    'memory_bandwidth': s['bandwidth'],
    'l2_cache_size': s['l2_bytes'],
    'clock_rate_ghz': s['clock_ghz'],
    'device_memory_size': chip.hbm_bytes,
    'shared_memory_per_block_optin': s['smem_optin'],
    'registers_per_core_limit': 65536,
    'registers_per_block_limit': 65536,
  }
  info = '\n'.join(f'  {k}: {v}' for k, v in fields.items())
  return (
    f'gpu_device_info {{\n{info}\n'
    f'  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\n'
    f'platform_name: "CUDA"\n'
    f'dnn_version_info {{ major: 9 minor: 1 }}\n'
    f'device_description_str: "{chip.name}"\n'
  )


@dataclasses.dataclass(frozen=True)
class Target:
  """A named slice or host group: how to get its devices, and what each chip is."""

  name: str
  chip: str  # Key of CHIPS.
  platform: str  # 'tpu' or 'cuda'
  topology: str  # TPU topology name, or GPU 'partitions x hosts x devices per host'.
  chip_config: str | None = None  # 'megacore': one device per v4/v5p chip (two TensorCores).
  slices: int = 1


# User-facing TPU names count TensorCores for v4 and v5p (two per chip, one megacore device)
# and chips for v5e and v6e; the values are (chip, topology JAX accepts, chip config).
TPU_SLICES = {
  'v4-8': ('v4', 'v4:2x2x1', 'megacore'),
  'v4-32': ('v4', 'v4:2x2x4', 'megacore'),
  'v5e-1': ('v5e', 'v5e:1x1', None),
  'v5e-8': ('v5e', 'v5e:2x4', None),
  'v5e-64': ('v5e', 'v5e:8x8', None),
  'v5e-256': ('v5e', 'v5e:16x16', None),
  'v5p-8': ('v5p', 'v5p:2x2x1', 'megacore'),
  'v5p-128': ('v5p', 'v5p:4x4x4', 'megacore'),
  'v6e-8': ('v6e', 'v6e:2x4', None),
  'v6e-256': ('v6e', 'v6e:16x16', None),
}
GPU_HOSTS = {'h100': ('h100', 1), 'h100x8': ('h100', 8), 'a100': ('a100', 1), 'a100x8': ('a100', 8)}


def known_targets() -> list[str]:
  return [*TPU_SLICES, *GPU_HOSTS]


def parse_target(name: str) -> Target:
  """'v5e-256', '2xv5p-8' (two slices), 'h100x8', '2xh100x8' (two hosts) -> Target."""
  match = re.fullmatch(r'(?:(\d+)x)?(.+)', name.strip().lower())
  count, base = int(match.group(1) or 1), match.group(2)
  if count < 1 or (base not in TPU_SLICES and base not in GPU_HOSTS):
    raise UserError(
      f'unknown target {name!r}; use one of {", ".join(known_targets())}, '
      'or Nx<target> for N slices or hosts (e.g. 2xv5e-256, 2xh100x8)'
    )
  if base in TPU_SLICES:
    chip, topology, chip_config = TPU_SLICES[base]
    return Target(name, chip, 'tpu', topology, chip_config, count)
  chip, per_host = GPU_HOSTS[base]
  return Target(name, chip, 'cuda', f'1x{count}x{per_host}', slices=count)


def prepare_process() -> None:
  """Settings `fdiff plan` needs before JAX starts: compile on CPU, libtpu without a TPU.

  JAX runs on its CPU backend (target devices come from topology descriptions,
  and the GPU plugin must not look for a local GPU). libtpu takes a process
  lock and asks the cloud metadata server about the TPU it runs on unless told
  otherwise; neither applies to compiling for a topology.
  """
  os.environ['JAX_PLATFORMS'] = 'cpu'
  for key, value in (
    ('ALLOW_MULTIPLE_LIBTPU_LOAD', '1'),
    ('TPU_SKIP_MDS_QUERY', '1'),
    ('TPU_ACCELERATOR_TYPE', 'v5litepod-1'),
    ('TPU_WORKER_HOSTNAMES', 'localhost'),
  ):
    os.environ.setdefault(key, value)
  import jax

  jax.config.update('jax_platforms', 'cpu')


def target_devices(target: Target):
  """The target's devices (abstract: they compile, they do not run)."""
  from jax.experimental import topologies

  try:
    if target.platform == 'tpu':
      kwargs = {'chip_config_name': target.chip_config} if target.chip_config else {}
      if target.slices > 1:
        kwargs['num_slices'] = target.slices
      topology = topologies.get_topology_desc(
        topology_name=target.topology, platform='tpu', **kwargs
      )
    else:
      topology = topologies.get_topology_desc(
        platform='cuda', target_config=gpu_target_config(target.chip), topology=target.topology
      )
  except Exception as e:  # noqa: BLE001 - a missing wheel or plugin surfaces here
    wheel = 'libtpu' if target.platform == 'tpu' else 'jax-cuda12-plugin'
    raise UserError(
      f'cannot describe target {target.name} ({str(e).splitlines()[0][:200]}); '
      f'install the plan extra ({wheel}): pip install -e ".[plan]"'
    ) from None
  return topology.devices


# ---- compiling for a target ----------------------------------------------------------


def _first_line(e):
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def is_out_of_memory(e: Exception) -> bool:
  text = str(e)
  return 'RESOURCE_EXHAUSTED' in text or 'Ran out of memory' in text or 'out of memory' in text


def memory(compiled) -> dict:
  """Per-chip bytes of a compiled program; peak = arguments + outputs - aliased + temporaries."""
  m = compiled.memory_analysis()
  stats = {
    'argument_bytes': int(m.argument_size_in_bytes),
    'output_bytes': int(m.output_size_in_bytes),
    'alias_bytes': int(m.alias_size_in_bytes),
    'temp_bytes': int(m.temp_size_in_bytes),
    'code_bytes': int(m.generated_code_size_in_bytes),
  }
  stats['peak_bytes'] = (
    stats['argument_bytes'] + stats['output_bytes'] - stats['alias_bytes'] + stats['temp_bytes']
  )
  return stats


def compiled_flops(compiled, platform: str) -> tuple[float, str]:
  """(per-chip FLOPs, source): XLA's cost analysis where it has one, else the HLO count."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if analysis and 'flops' in analysis and platform != 'cuda':
    return float(analysis['flops']), 'xla_cost_analysis'
  return float(hlo_flops(compiled.as_text())['total']), 'hlo_count'


class Planner:
  """The real train step and guided sampler call of `config`, compiled for one target."""

  def __init__(self, config, target: Target):
    import jax

    from fdiff_jax import checkpoints, diffusion, parallel, train
    from fdiff_jax.data import pipeline
    from fdiff_jax.models import build_model
    from fdiff_jax.train_state import initial_state, make_optimizer

    config = config.copy_and_resolve_references()
    if config.model.get('kernels', 'auto') == 'auto':
      config.model.kernels = 'xla'  # What 'auto' picks on a TPU or GPU.
    self.config, self.target = config, target
    self.devices = target_devices(target)
    self.mesh = parallel.create_mesh(self.devices)
    self.chips = len(self.devices)
    self.image_shape = pipeline.image_shape(config)
    model = build_model(config.model, len(pipeline.attribute_names(config)))
    self.model, self.num_attributes = model, model.num_attributes or 1
    tx = make_optimizer(config.train)
    schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.timesteps)
    self.step = train.jit_train_step(config, model, tx, schedule, self.mesh)
    self.state = checkpoints.abstract_state(
      functools.partial(initial_state, config, model, tx), parallel.replicated(self.mesh)
    )
    self._replicated = parallel.replicated(self.mesh)
    self._batch_sharding = parallel.batch_sharding(self.mesh)
    self._jax = jax

  def state_bytes(self) -> int:
    """Bytes of the train state (parameters, optimizer state, EMA) that every chip holds."""
    return sum(x.size * x.dtype.itemsize for x in self._jax.tree.leaves(self.state))

  def check_batch(self, batch: int) -> None:
    if batch < 1 or batch % self.chips:
      raise UserError(
        f'batch size {batch} does not divide over the {self.chips} chips of {self.target.name}; '
        f'set config.train.batch_size to a multiple of {self.chips}'
      )

  def _batch(self, batch):
    import jax.numpy as jnp

    spec = lambda shape, dtype=jnp.float32: self._jax.ShapeDtypeStruct(
      shape, dtype, sharding=self._batch_sharding
    )
    return {
      'image': spec((batch,) + self.image_shape),
      'attributes': spec((batch, self.num_attributes)),
    }

  def lower_train(self, batch: int):
    """The train step lowered for a global `batch` (the whole program, before partitioning)."""
    self.check_batch(batch)
    return self.step.lower(self.state, self._batch(batch))

  def compile_train(self, batch: int):
    """The train step compiled for a global `batch`: the per-chip program."""
    return self.lower_train(batch).compile()

  def model_flops_per_chip(self, batch: int) -> float:
    """FLOPs of the program as written (before XLA's rewrites and padding), per chip."""
    return hlo_flops(self.lower_train(batch).as_text(dialect='hlo'))['total'] / self.chips

  def compile_sampler(self, batch: int):
    """One guided denoiser evaluation (what each solver step calls) for a global `batch`."""
    import jax.numpy as jnp

    from fdiff_jax.sampler import Sampler

    self.check_batch(batch)
    params = self.state.params
    sampler = Sampler(self.config, self.model, params)
    call = self._jax.jit(
      functools.partial(sampler.guided_output, guidance=float(self.config.sample.guidance)),
      in_shardings=(
        self._replicated,
        self._batch_sharding,
        self._batch_sharding,
        self._batch_sharding,
      ),
      out_shardings=self._batch_sharding,
    )
    data = self._batch(batch)
    t = self._jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=self._batch_sharding)
    return call.lower(params, data['image'], t, data['attributes']).compile()

  def try_train(self, batch):
    """(memory stats, compiled) of the train step at `batch`; (None, None) when out of HBM."""
    try:
      compiled = self.compile_train(batch)
    except UserError:
      raise
    except Exception as e:  # noqa: BLE001 - XLA reports a program too big for HBM this way
      if is_out_of_memory(e):
        return None, None
      raise
    return memory(compiled), compiled


def _fits(stats, chip):
  return stats is not None and stats['peak_bytes'] <= chip.hbm_bytes * chip.usable


def largest_batch(planner, first_stats, batch, max_compiles, deadline):
  """Largest global batch (a multiple of the chips) whose train step fits, by compiling.

  Per-chip batches are probed where a straight line through the last two
  compiled peaks meets the usable HBM, then by bisection, within `max_compiles`
  compiles and the deadline. Returns (largest verified, smallest refused or None, probes).
  """
  chip, n = CHIPS[planner.target.chip], planner.chips
  probes = {batch // n: first_stats}
  fit = lambda k: _fits(probes[k], chip)
  for _ in range(max_compiles):
    if time.monotonic() > deadline:
      break
    good = [k for k in probes if fit(k)]
    bad = [k for k in probes if not fit(k)]
    lo, hi = max(good, default=0), min(bad, default=None)
    if hi is not None and hi - lo <= 1:
      break
    measured = sorted((k, s['peak_bytes']) for k, s in probes.items() if s is not None)
    guess = None
    if len(measured) >= 2:
      (k0, p0), (k1, p1) = measured[-2], measured[-1]
      slope = (p1 - p0) / (k1 - k0)
      if slope > 0:
        guess = int(k1 + (chip.hbm_bytes * chip.usable - p1) // slope)
    if guess is None:
      guess = 2 * lo if hi is None else (lo + hi) // 2
    upper = hi - 1 if hi is not None else min(max(2 * lo, guess), 16 * lo)  # No wild jumps.
    guess = min(max(guess, lo + 1), upper)
    if guess in probes or guess < 1:
      guess = (lo + hi) // 2 if hi is not None else 2 * lo
      if guess in probes or guess < 1:
        break
    probes[guess], _ = planner.try_train(guess * n)
  good = [k for k in probes if fit(k)]
  bad = [k for k in probes if not fit(k)]
  lo, hi = max(good, default=0), min(bad, default=None)
  return lo * n, (hi * n if hi is not None else None), len(probes) - 1


def estimate(flops_per_chip, chip, dtype, utilisation):
  """Compute-bound seconds per call at `utilisation` of the chip's published peak."""
  peak = chip.bf16_tflops if dtype == 'bfloat16' else chip.f32_tflops
  return flops_per_chip / (peak * 1e12 * utilisation), peak


def plan(
  config,
  target_name: str,
  *,
  search_compiles: int = DEFAULT_SEARCH_COMPILES,
  search_seconds: float = 1800.0,
  utilisation: float = DEFAULT_UTILISATION,
  sampler: bool = True,
) -> dict:
  """Compiles `config`'s train step (and guided sampler call) for one target; see the module doc."""
  target = parse_target(target_name)
  chip = CHIPS[target.chip]
  planner = Planner(config, target)
  batch = int(config.train.batch_size)
  planner.check_batch(batch)
  dtype = str(planner.config.model.dtype)
  usable = chip.hbm_bytes * chip.usable
  state_bytes = planner.state_bytes()
  if state_bytes > usable:  # Replicated on every chip: no batch helps, no need to compile.
    raise UserError(
      f'the model does not fit on {target.name} even at batch 1 per chip: its parameters, '
      f'optimizer state and EMA alone take {state_bytes / GIB:.1f} GiB of the '
      f'{usable / GIB:.1f} GiB usable per {chip.name}; make the model smaller '
      '(config.model) or use a chip with more memory'
    )
  start = time.monotonic()
  stats, compiled = planner.try_train(batch)
  compile_s = time.monotonic() - start
  smallest = stats if batch == planner.chips else None
  if not _fits(stats, chip) and smallest is None:
    smallest, _ = planner.try_train(planner.chips)
  if not _fits(stats, chip) and not _fits(smallest, chip):
    need = f'{smallest["peak_bytes"] / GIB:.1f} GiB' if smallest else 'more than it has'
    raise UserError(
      f'the model does not fit on {target.name} even at batch 1 per chip: it needs {need} '
      f'of the {chip.hbm_bytes * chip.usable / GIB:.1f} GiB usable per {chip.name}; '
      'make the model smaller (config.model) or use a chip with more memory'
    )
  result = {
    'target': target.name,
    'chip': chip.name,
    'chips': planner.chips,
    'dtype': dtype,
    'global_batch': batch,
    'per_chip_batch': batch // planner.chips,
    'hbm_bytes': chip.hbm_bytes,
    'usable_hbm_bytes': int(chip.hbm_bytes * chip.usable),
    'compile_s': compile_s,
    'utilisation': utilisation,
  }
  if stats is None:
    result.update(fits=False, train=None)
  else:
    flops, source = compiled_flops(compiled, target.platform)
    seconds, peak = estimate(flops, chip, dtype, utilisation)
    result.update(
      fits=_fits(stats, chip),
      peak_tflops=peak,
      train={
        **stats,
        'flops_per_chip': flops,
        'flops_source': source,
        'hlo_flops_per_chip': hlo_flops(compiled.as_text()),
        'model_flops_per_chip': planner.model_flops_per_chip(batch),
        'step_s': seconds,
        'images_per_s': batch / seconds,
      },
    )
  if search_compiles > 0:
    largest, refused, probes = largest_batch(
      planner, stats, batch, search_compiles, time.monotonic() + search_seconds
    )
    result['largest_batch'] = largest
    result['smallest_refused_batch'] = refused
    result['largest_batch_exact'] = refused is not None and refused - largest == planner.chips
    result['search_compiles'] = probes
  if sampler:
    compiled = planner.compile_sampler(batch)
    flops, source = compiled_flops(compiled, target.platform)
    seconds, _ = estimate(flops, chip, dtype, utilisation)
    steps = int(config.sample.steps)
    result['sampler'] = {
      **memory(compiled),
      'flops_per_chip': flops,
      'flops_source': source,
      'steps': steps,
      'images_per_s': batch / (seconds * steps),
    }
  return result


def _gib(x):
  return f'{x / GIB:.2f}' if x is not None else '-'


def format_table(results) -> str:
  """A readable table: one row per target, memory in GiB per chip, estimates at the utilisation."""
  head = (
    'target',
    'chips',
    'batch',
    'per chip',
    'args GiB',
    'temp GiB',
    'peak GiB',
    'HBM GiB',
    'fits',
    'largest batch',
    'TFLOP/step/chip',
    'est step ms',
    'est img/s',
    'sample img/s',
  )
  rows = []
  for r in results:
    train = r.get('train') or {}
    largest = r.get('largest_batch')
    if largest is not None and not r.get('largest_batch_exact'):
      refused = r.get('smallest_refused_batch')
      largest = f'>={largest}' if refused is None else f'{largest} (<{refused})'
    sample = r.get('sampler') or {}
    rows.append(
      (
        r['target'],
        str(r['chips']),
        str(r['global_batch']),
        str(r['per_chip_batch']),
        _gib(train.get('argument_bytes')),
        _gib(train.get('temp_bytes')),
        _gib(train.get('peak_bytes')),
        _gib(r['usable_hbm_bytes']),
        'yes' if r['fits'] else 'NO',
        '-' if largest is None else str(largest),
        f'{train["flops_per_chip"] / 1e12:.3f}' if train else '-',
        f'{train["step_s"] * 1e3:.1f}' if train else '-',
        f'{train["images_per_s"]:.0f}' if train else '-',
        f'{sample["images_per_s"]:.0f}' if sample else '-',
      )
    )
  widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
  line = lambda cells: '  '.join(c.rjust(w) for c, w in zip(cells, widths))
  out = [line(head)] + [line(row) for row in rows]
  if results:
    r = results[0]
    out.append(
      f'dtype {r["dtype"]}; estimates compute-bound at {r["utilisation"]:.0%} of the published '
      'peak; HBM GiB = usable per chip (75% on GPU: JAX preallocation)'
    )
  return '\n'.join(out)


def write_json(results, path):
  with open(path, 'w') as f:
    json.dump(results, f, indent=2)
