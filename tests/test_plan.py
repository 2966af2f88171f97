"""`fdiff plan`: the real train step compiled for a TPU slice and a GPU host that are not here."""

import functools
import importlib.util
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fdiff_jax import checkpoints, cli, config_utils, diffusion, flop_count, parallel, plan, train
from fdiff_jax.data import pipeline
from fdiff_jax.models import build_model
from fdiff_jax.train_state import initial_state, make_optimizer

pytestmark = pytest.mark.skipif(
  importlib.util.find_spec('libtpu') is None
  or importlib.util.find_spec('jax_plugins.xla_cuda12') is None,
  reason='needs the plan extra (libtpu, jax-cuda12-plugin): pip install -e ".[plan]"',
)

# The tiny test U-Net with one level: every kind of layer, quicker to compile.
SMALL = [
  'model.ch_mult=(1,)',
  'model.attn_resolutions=(16,)',
  'train.batch_size=8',
]
TARGETS = 'v5e-8,h100x8'


def small_config(*extra):
  return config_utils.load_config('configs/test.py', SMALL + list(extra))


@pytest.fixture(scope='module', autouse=True)
def _plan_process():
  plan.prepare_process()  # What `fdiff plan` does first: libtpu without a TPU.


@pytest.fixture(scope='module')
def planned(tmp_path_factory, _plan_process):
  """`fdiff plan` of the small config for one TPU slice and one GPU host, from its JSON."""
  out = tmp_path_factory.mktemp('plan') / 'plan.json'
  args = ['plan', '--config', 'configs/test.py', '--target', TARGETS, '--search-compiles', '0']
  args += ['--no-sampler', '--json', str(out)] + [f'--config.{o}' for o in SMALL]
  assert cli.main(args) == 0
  return {r['target']: r for r in json.loads(out.read_text())}


def _bytes(tree):
  return sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def test_per_chip_batch_memory_and_estimates(planned):
  for name, r in planned.items():
    assert r['chips'] == 8 and r['global_batch'] == 8 and r['per_chip_batch'] == 1, name
    t = r['train']
    assert t['peak_bytes'] == (
      t['argument_bytes'] + t['output_bytes'] - t['alias_bytes'] + t['temp_bytes']
    )
    assert r['fits'] and t['peak_bytes'] < r['usable_hbm_bytes']
    # Donated state: the outputs (new state, metrics) reuse the arguments' buffers.
    assert t['alias_bytes'] > 0.9 * t['output_bytes']
    assert t['step_s'] == pytest.approx(
      t['flops_per_chip'] / (r['peak_tflops'] * 1e12 * r['utilisation'])
    )
    assert t['images_per_s'] == pytest.approx(8 / t['step_s'])
  assert planned['v5e-8']['train']['flops_source'] == 'xla_cost_analysis'
  assert planned['h100x8']['train']['flops_source'] == 'hlo_count'


def test_gpu_argument_bytes_are_state_plus_the_chips_batch_shard(planned):
  config = small_config()
  model = build_model(config.model, len(pipeline.attribute_names(config)))
  tx = make_optimizer(config.train)
  state = jax.eval_shape(functools.partial(initial_state, config, model, tx))
  params, opt, ema = _bytes(state.params), _bytes(state.opt_state), _bytes(state.ema_params)
  assert params == ema and opt > 2 * params  # Adam: two moments per parameter.
  per_chip = 1
  shard = per_chip * (math.prod(pipeline.image_shape(config)) + 40) * 4  # float32 images, attrs
  expected = params + opt + ema + _bytes(state.step) + shard
  assert planned['h100x8']['train']['argument_bytes'] == expected
  # TPU arrays are tiled in HBM, so there the same arguments take at least as much.
  assert planned['v5e-8']['train']['argument_bytes'] >= expected


def test_conv_flops_match_hand_count_on_gpu_and_cpu():
  n, h, w, cin, cout, k = 4, 20, 20, 8, 16, 3
  hand = 2 * n * (h - k + 1) * (w - k + 1) * cin * cout * k * k
  conv = lambda x, f: jax.lax.conv_general_dilated(
    x, f, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  x, f = jnp.zeros((n, h, w, cin)), jnp.zeros((k, k, cin, cout))
  cpu = jax.jit(conv).lower(x, f).compile()
  assert cpu.cost_analysis()['flops'] == hand
  assert flop_count.hlo_flops(cpu.as_text())['total'] == hand
  mesh = Mesh(plan.target_devices(plan.parse_target('h100')), ('d',))
  spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P()))
  gpu = jax.jit(conv).lower(spec(x), spec(f)).compile().as_text()
  assert '__cudnn$conv' in gpu  # The convolution runs in cuDNN ...
  assert flop_count.hlo_flops(gpu) == {
    'total': hand,
    'matmul': 0,
    'custom_call_matmul': hand,
  }  # counted


def test_gpu_counter_counts_cublas_gemms():
  mesh = Mesh(plan.target_devices(plan.parse_target('h100')), ('d',))
  spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32, sharding=NamedSharding(mesh, P()))
  # Without Triton GEMM fusions every dot becomes a cuBLAS custom call.
  compiled = (
    jax.jit(jnp.dot)
    .lower(spec(256, 512), spec(512, 1024))
    .compile({'xla_gpu_enable_triton_gemm': False})
  )
  text = compiled.as_text()
  assert '__cublas$' in text and ' dot(' not in text
  assert compiled.cost_analysis() is None  # Why the count is ours on GPU.
  assert flop_count.hlo_flops(text)['custom_call_matmul'] == 2 * 256 * 512 * 1024


def test_gpu_train_step_count_matches_xla_on_cpu(planned):
  """The GPU program (GEMMs and convolutions in cuBLAS/cuDNN) counts as XLA counts it on CPU."""
  gpu_flops = planned['h100x8']['train']['hlo_flops_per_chip']  # One image per GPU.
  assert gpu_flops['custom_call_matmul'] > 0  # cuDNN convolutions, cuBLAS GEMMs
  config = small_config('model.kernels=xla', 'train.batch_size=1')  # As on the GPU.
  model = build_model(config.model, len(pipeline.attribute_names(config)))
  mesh = parallel.create_mesh(jax.devices()[:1])
  tx = make_optimizer(config.train)
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.timesteps)
  step = train.jit_train_step(config, model, tx, schedule, mesh)
  state = checkpoints.abstract_state(
    functools.partial(initial_state, config, model, tx), parallel.replicated(mesh)
  )
  batch = {
    'image': jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32),
    'attributes': jax.ShapeDtypeStruct((1, 40), jnp.float32),
  }
  cpu = step.lower(state, batch).compile()
  # Measured: 1.6% apart (elementwise work fuses differently); the GEMMs agree to 0.1%.
  assert gpu_flops['total'] == pytest.approx(cpu.cost_analysis()['flops'], rel=0.03)
  cpu_matmul = flop_count.hlo_flops(cpu.as_text())['matmul']
  assert gpu_flops['matmul'] + gpu_flops['custom_call_matmul'] == pytest.approx(
    cpu_matmul, rel=0.005
  )


def test_sampler_call_compiles_for_a_gpu_host():
  planner = plan.Planner(small_config(), plan.parse_target('h100x8'))
  compiled = planner.compile_sampler(8)
  # Arguments: the parameters (no optimizer state or EMA) and one image, timestep and
  # attribute row per chip.
  expected = _bytes(planner.state.params) + (16 * 16 * 3 + 1 + 40) * 4
  assert plan.memory(compiled)['argument_bytes'] == expected
  assert flop_count.hlo_flops(compiled.as_text())['custom_call_matmul'] > 0


def _one_error_line(capsys, args):
  code = cli.main(args)
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1, err
  return err[0]


def test_unknown_target_lists_the_known_ones(capsys):
  line = _one_error_line(capsys, ['plan', '--config', 'configs/test.py', '--target', 'v9-8'])
  assert "'v9-8'" in line and 'v5e-256' in line and 'h100x8' in line and '2xv5e-256' in line


def test_batch_that_does_not_divide_the_chips_is_refused(capsys):
  line = _one_error_line(
    capsys,
    ['plan', '--config', 'configs/test.py', '--target', 'v5e-8', '--config.train.batch_size=12'],
  )
  assert '12' in line and '8 chips' in line and 'multiple of 8' in line


def test_target_names_map_to_topologies():
  assert plan.parse_target('v4-8') == plan.Target('v4-8', 'v4', 'tpu', 'v4:2x2x1', 'megacore')
  assert plan.parse_target('2xv5p-8').slices == 2
  assert plan.parse_target('2xh100x8').topology == '1x2x8'
  sizes = {'v4-8': 4, 'v5e-8': 8, 'v5p-8': 4, 'v6e-8': 8, '2xv5e-256': 512, '2xh100x8': 16}
  for name, chips in sizes.items():
    assert len(plan.target_devices(plan.parse_target(name))) == chips, name


def test_model_that_does_not_fit_is_refused(capsys):
  args = ['plan', '--config', 'configs/test.py', '--target', 'v5e-8', '--search-compiles', '0']
  args += ['--no-sampler'] + [f'--config.{o}' for o in SMALL] + ['--config.model.ch=4096']
  line = _one_error_line(capsys, args)  # About 1.2e9 parameters: ~19 GB of state per chip.
  assert 'does not fit on v5e-8 even at batch 1 per chip' in line and '16.0 GiB' in line
