"""Throughput and FLOP-utilisation benchmark behind `fdiff bench`.

Times the real jitted train step (loss, AdamW, EMA, donated state) and the
whole jitted sampler with classifier-free guidance on random inputs of the
configured shape, so no dataset is needed (`data` times the input pipeline
alone on the configured dataset). FLOPs come from XLA's cost
analysis; utilisation is reported against the accelerator's published peak
(or --peak-tflops) and, on CPU, against a large float32 matmul timed in the
same run, a ceiling that moves with the machine's load.
"""

import functools
import json
import os
import platform
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from fdiff_jax import diffusion, parallel, train
from fdiff_jax.data import pipeline
from fdiff_jax.errors import UserError
from fdiff_jax.models import build_model, count_params, init_params
from fdiff_jax.sampler import Sampler, default_steps
from fdiff_jax.train_state import make_optimizer

WORKLOADS = ('train', 'sample')  # Timed model programs.
ALL_WORKLOADS = (*WORKLOADS, 'data')
DATA_THREADS = (1, 2, 4)
MATMUL_SIZE = 2048

# Published dense bf16 peaks (TFLOP/s), matched in order against device_kind.
PUBLISHED_PEAK_TFLOPS = (
  ('h100', 989.0),
  ('h200', 989.0),
  ('a100', 312.0),
  ('tpu v4', 275.0),
  ('tpu v5 lite', 197.0),
  ('tpu v5e', 197.0),
  ('tpu v5', 459.0),
  ('tpu v6 lite', 918.0),
  ('tpu v6e', 918.0),
)


def parse_workloads(text):
  """'train,sample' -> ('train', 'sample'); anything else is a UserError."""
  names = tuple(w.strip() for w in text.split(',') if w.strip())
  bad = [w for w in names if w not in ALL_WORKLOADS]
  if bad or not names:
    raise UserError(
      f'workloads {text!r}: expected a comma-separated subset of {",".join(ALL_WORKLOADS)}'
    )
  return names


def parse_threads(text):
  """'1,2,4' -> (1, 2, 4); anything else is a UserError."""
  try:
    threads = tuple(int(t) for t in text.split(',') if t.strip())
  except ValueError:
    threads = ()
  if not threads or min(threads) < 1:
    raise UserError(f'threads {text!r}: expected comma-separated positive counts, e.g. 1,2,4')
  return threads


def published_peak_tflops(device_kind):
  """The published bf16 peak of a known accelerator, else None."""
  kind = device_kind.lower()
  return next((peak for name, peak in PUBLISHED_PEAK_TFLOPS if name in kind), None)


def time_calls(fn, repeats):
  """Seconds of `repeats` calls of fn() after one warm-up, each blocking on its result."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def compile_timed(jitted, *args):
  """(compiled executable, seconds spent lowering and compiling)."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def xla_flops(stage):
  """FLOPs of a lowered or compiled program by XLA's cost analysis (loop bodies count once)."""
  analysis = stage.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis['flops'])


def matmul_flops_per_sec(repeats, n=MATMUL_SIZE):
  """Median FLOP/s of a float32 n x n matmul: the same-run ceiling on CPU."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  matmul, _ = compile_timed(jax.jit(jnp.matmul), a, a)
  return 2 * n**3 / statistics.median(time_calls(lambda: matmul(a, a), repeats))


def reset_host_peak():
  """Restarts the process's peak-RSS count (Linux); True if it could."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def peak_memory(host_peak_was_reset):
  """(bytes, source) of the last workload's peak memory.

  'device': the accelerator's peak allocation, over the whole process (JAX
  cannot reset it). 'host_rss': the peak RSS since `reset_host_peak` on Linux,
  'host_rss_process' (the whole process's peak) where it could not be reset.
  """
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'device'
  if host_peak_was_reset:
    with open('/proc/self/status') as f:
      peak_kib = next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))
    return peak_kib * 1024, 'host_rss'
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 'host_rss_process'


def random_inputs(config, batch, num_attributes, seed=0):
  """Images in [-1, 1] and +-1 attributes of the configured shape, as numpy."""
  rng = np.random.default_rng(seed)
  image = rng.uniform(-1, 1, (batch,) + pipeline.image_shape(config)).astype(np.float32)
  attributes = rng.choice([-1.0, 1.0], (batch, num_attributes)).astype(np.float32)
  return image, attributes


def summarize(times, images, flops, peak_tflops, ceiling):
  """Timing statistics, throughput, achieved FLOP/s and utilisations of one workload."""
  median = statistics.median(times)
  achieved = flops / median
  return {
    'seconds_median': median,
    'seconds_min': min(times),
    'seconds_max': max(times),
    'images_per_sec': images / median,
    'images_per_sec_min': images / max(times),
    'images_per_sec_max': images / min(times),
    'flops_per_call': flops,
    'achieved_tflops': achieved / 1e12,
    'utilisation_vs_peak': achieved / (peak_tflops * 1e12) if peak_tflops else None,
    'matmul_ceiling_tflops': ceiling / 1e12 if ceiling else None,
    'utilisation_vs_matmul': achieved / ceiling if ceiling else None,
  }


def bench_train(config, model, mesh, batch, repeats):
  """Compile time and steady-state timing of the jitted, state-donating train step."""
  tx = make_optimizer(config.train)
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.timesteps)
  step = train.jit_train_step(config, model, tx, schedule, mesh)
  state = train.init_state(config, model, tx, mesh)
  image, attributes = random_inputs(config, batch, model.num_attributes or 1)
  data = parallel.global_batch({'image': image, 'attributes': attributes}, mesh)
  compiled, compile_s = compile_timed(step, state, data)

  def call():
    nonlocal state
    state, metrics = compiled(state, data)
    return metrics

  return compile_s, xla_flops(compiled), time_calls(call, repeats)


def bench_sample(config, model, mesh, batch, repeats, *, sampler, steps, guidance):
  """Compile time and timing of the whole jitted sampler; FLOPs = steps x one guided call."""
  params = init_params(
    model,
    jax.random.key(config.seed),
    pipeline.image_shape(config),
    out_sharding=parallel.replicated(mesh),
  )
  runner = Sampler(config, model, params)
  image, attributes = random_inputs(config, batch, model.num_attributes or 1)
  start = time.perf_counter()
  run = runner.compiled(image, attributes, guidance, solver=sampler, steps=steps)
  compile_s = time.perf_counter() - start
  t = jnp.zeros((batch,), jnp.int32)
  guided = jax.jit(functools.partial(runner.guided_output, guidance=guidance))
  step_flops = xla_flops(guided.lower(params, jnp.asarray(image), t, jnp.asarray(attributes)))
  return compile_s, step_flops * steps, time_calls(run, repeats)


def bench_data(config, batch, repeats, threads=DATA_THREADS, batches_per_repeat=50):
  """Images/s of finished training batches from the prepared arrays, per thread count.

  Preparing the TFDS dataset and the arrays is timed first and apart (near 0 s
  when already prepared). Each thread count gets a fresh iterator, a warm-up
  of `batches_per_repeat` batches, then `repeats` timed runs of as many.
  """
  from fdiff_jax.data import sources  # pylint: disable=import-outside-toplevel

  config = config.copy_and_resolve_references()
  config.train.batch_size = batch
  split = config.data.train_split
  start = time.perf_counter()
  sources.open_split(config, split)
  tfds_seconds = time.perf_counter() - start
  start = time.perf_counter()
  arrays = pipeline.open_arrays(config, split)
  prepare_seconds = time.perf_counter() - start
  runs = []
  for count in threads:
    batches = pipeline.create_train_iterator(config, arrays=arrays, threads=count)
    times = []
    try:
      for i in range(repeats + 1):  # The first is the warm-up.
        start = time.perf_counter()
        for _ in range(batches_per_repeat):
          next(batches)
        times.append(time.perf_counter() - start)
    finally:
      batches.close()
    images = batch * batches_per_repeat
    runs.append(
      {
        'threads': count,
        'images_per_sec': images / statistics.median(times[1:]),
        'images_per_sec_min': images / max(times[1:]),
        'images_per_sec_max': images / min(times[1:]),
      }
    )
  return {
    'dataset': config.data.dataset,
    'split': split,
    'examples': len(arrays),
    'image_shape': list(pipeline.image_shape(config)),
    'batch': batch,
    'random_flip': bool(config.data.random_flip),
    'batches_per_repeat': batches_per_repeat,
    'tfds_prepare_seconds': tfds_seconds,
    'prepare_seconds': prepare_seconds,
    'runs': runs,
  }


def parameter_count(model, image_shape):
  """Number of parameters of `model`, from shapes only."""
  x = jnp.zeros((1,) + tuple(image_shape))
  a = jnp.zeros((1, model.num_attributes)) if model.num_attributes else None
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, jnp.zeros((1,), jnp.int32), a)
  return count_params(shapes['params'])


def machine():
  """What ran the benchmark: device, host, software and load."""
  device = jax.local_devices()[0]
  return {
    'platform': device.platform,
    'device_kind': device.device_kind,
    'num_devices': jax.device_count(),
    'processor': platform.processor() or platform.machine(),
    'cpu_count': os.cpu_count(),
    'load_average': list(os.getloadavg()),
    'jax_version': jax.__version__,
    'xla_flags': os.environ.get('XLA_FLAGS', ''),
    'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
  }


def run(
  config,
  *,
  what=WORKLOADS,
  batch=None,
  sampler=None,
  steps=None,
  guidance=None,
  repeats=5,
  peak_tflops=None,
  threads=DATA_THREADS,
):
  """Benchmarks the workloads in `what`; returns a JSON-ready dict."""
  if repeats < 1:
    raise UserError(f'repeats must be at least 1, got {repeats}')
  batch = batch or config.train.batch_size
  sampler = sampler or config.sample.sampler
  steps = default_steps(config, sampler, steps)
  guidance = config.sample.guidance if guidance is None else guidance
  mesh = parallel.create_mesh()
  parallel.check_global_batch(batch, mesh)
  info = machine()
  peak = peak_tflops or published_peak_tflops(info['device_kind'])
  model = build_model(config.model, len(pipeline.attribute_names(config)))
  shape = pipeline.image_shape(config)
  result = {
    'machine': info,
    'peak_tflops': peak,
    'model': {
      'params': parameter_count(model, shape),
      'image_shape': list(shape),
      'dtype': config.model.dtype,
    },
  }
  if 'data' in what:
    result['data'] = bench_data(config, batch, repeats, threads)
  for name in (w for w in what if w in WORKLOADS):
    host_peak_was_reset = reset_host_peak()
    if name == 'train':
      compile_s, flops, times = bench_train(config, model, mesh, batch, repeats)
      extra = {}
    else:
      compile_s, flops, times = bench_sample(
        config, model, mesh, batch, repeats, sampler=sampler, steps=steps, guidance=guidance
      )
      extra = {'sampler': sampler, 'steps': steps, 'guidance': guidance}
    ceiling = matmul_flops_per_sec(repeats) if info['platform'] == 'cpu' else None
    memory, memory_source = peak_memory(host_peak_was_reset)
    result[name] = {
      'batch': batch,
      **extra,
      'compile_seconds': compile_s,
      **summarize(times, batch, flops, peak, ceiling),
      'peak_memory_bytes': memory,
      'peak_memory_source': memory_source,
    }
  return result


def _percent(x):
  return '-' if x is None else f'{100 * x:.0f}%'


def format_table(result):
  """A readable table of a `run` result."""
  m = result['machine']
  lines = [
    f'{m["device_kind"]} ({m["platform"]}, {m["num_devices"]} device(s), '
    f'{m["cpu_count"]} CPUs, load {" ".join(f"{x:.2f}" for x in m["load_average"])}); '
    f'model {result["model"]["params"] / 1e6:.2f}M params, '
    f'{"x".join(map(str, result["model"]["image_shape"]))} {result["model"]["dtype"]}',
  ]
  if any(name in result for name in WORKLOADS):
    lines.append(
      f'{"":8}{"batch":>6}{"compile s":>10}{"median s (min-max)":>26}{"images/s":>10}'
      f'{"GFLOP/call":>12}{"TFLOP/s":>9}{"vs peak":>8}{"vs matmul":>10}{"peak mem":>10}'
    )
  for name in WORKLOADS:
    if name not in result:
      continue
    r = result[name]
    spread = f'{r["seconds_median"]:.3f} ({r["seconds_min"]:.3f}-{r["seconds_max"]:.3f})'
    lines.append(
      f'{name:8}{r["batch"]:>6}{r["compile_seconds"]:>10.1f}{spread:>26}'
      f'{r["images_per_sec"]:>10.2f}{r["flops_per_call"] / 1e9:>12.1f}'
      f'{r["achieved_tflops"]:>9.3f}{_percent(r["utilisation_vs_peak"]):>8}'
      f'{_percent(r["utilisation_vs_matmul"]):>10}'
      f'{r["peak_memory_bytes"] / 2**30:>7.2f}GiB'
    )
  for name in WORKLOADS:
    if result.get(name, {}).get('matmul_ceiling_tflops'):
      lines.append(
        f'{name}: float32 {MATMUL_SIZE}^2 matmul ceiling '
        f'{result[name]["matmul_ceiling_tflops"]:.3f} TFLOP/s'
      )
  if 'sample' in result:
    s = result['sample']
    lines.append(f'sample: {s["sampler"]} {s["steps"]} steps, guidance {s["guidance"]}')
  if 'data' in result:
    d = result['data']
    lines.append(
      f'data: {d["dataset"]} {d["split"]} ({d["examples"]} examples), '
      f'{"x".join(map(str, d["image_shape"]))}, batch {d["batch"]}, '
      f'random flip {"on" if d["random_flip"] else "off"}; prepared in '
      f'{d["prepare_seconds"]:.1f} s (TFDS {d["tfds_prepare_seconds"]:.1f} s), not counted'
    )
    lines.append(f'{"threads":>12}{"images/s (min-max)":>28}')
    for r in d['runs']:
      spread = f'{r["images_per_sec"]:.0f} ({r["images_per_sec_min"]:.0f}-'
      spread += f'{r["images_per_sec_max"]:.0f})'
      lines.append(f'{r["threads"]:>12}{spread:>28}')
  return '\n'.join(lines)


def write_json(result, path):
  with open(path, 'w') as f:
    json.dump(result, f, indent=2)
