"""The real training loop on a tiny synthetic CelebA through the real TFDS builder."""

import functools
import json
import os
import subprocess
import sys
import textwrap

import faces
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from preemption import sigterm_after_first_loss

from configs import test as test_config
from fdiff_jax import checkpoints, cli, config_utils, diffusion, loop, parallel, train
from fdiff_jax.data import pipeline
from fdiff_jax.models import build_model
from fdiff_jax.train_state import ema_decay, initial_state, learning_rate_schedule, make_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def celeba_dirs(tmp_path_factory):
  return faces.synthetic_celeba(tmp_path_factory.mktemp('celeba'), num=60)


make_config = faces.config_on


def final_params(workdir, config):
  """Step, parameters and EMA parameters of the latest checkpoint, as numpy."""
  model = build_model(config.model, len(pipeline.attribute_names(config)))
  init_fn = functools.partial(initial_state, config, model, make_optimizer(config.train))
  restored = checkpoints.load_state(workdir, init_fn)
  return int(restored.step), jax.device_get(restored.params), jax.device_get(restored.ema_params)


@pytest.fixture(scope='module')
def straight_run(celeba_dirs, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('straight'))
  history = train.train_diffusion(make_config(celeba_dirs), workdir)
  return workdir, history


def test_training_writes_checkpoints_config_and_sample_grid(straight_run, celeba_dirs):
  workdir, history = straight_run
  assert [h['step'] for h in history] == list(range(1, 7))
  assert all(np.isfinite(h['loss']) for h in history)
  manager = checkpoints.checkpoint_manager(workdir)
  assert sorted(manager.all_steps()) == [3, 6]
  manager.close()
  saved = checkpoints.load_config(workdir)
  assert saved.model.ch == 16 and tuple(saved.model.ch_mult) == (1, 2)
  assert saved.data.manual_dir == celeba_dirs[0]
  grid = os.path.join(workdir, 'samples', 'step_0000006.png')
  assert os.path.getsize(grid) > 0


def test_sampling_uses_the_ema_parameters(straight_run, celeba_dirs):
  workdir, _ = straight_run
  step, params, ema = final_params(workdir, make_config(celeba_dirs))
  loaded = checkpoints.load_model(workdir)
  assert loaded.step == 6
  for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(ema)):
    np.testing.assert_array_equal(a, b)
  assert step == 6 and any(
    np.abs(p - e).max() > 0 for p, e in zip(jax.tree.leaves(params), jax.tree.leaves(ema))
  )


def test_learning_rate_warms_up_then_decays_and_ema_decay_warms_up():
  config = test_config.get_config().train
  config.update(learning_rate=1e-3, warmup_steps=10, num_steps=110, lr_schedule='cosine')
  lr = learning_rate_schedule(config)
  np.testing.assert_allclose(
    [lr(0), lr(5), lr(10), lr(60), lr(110)], [0, 5e-4, 1e-3, 5e-4, 0], atol=1e-9
  )
  config.lr_schedule = 'constant'
  np.testing.assert_allclose(
    [learning_rate_schedule(config)(s) for s in (5, 10, 10_000)], [5e-4, 1e-3, 1e-3], atol=1e-9
  )
  config.ema_decay = 0.99
  np.testing.assert_allclose(
    [ema_decay(config, s) for s in (0, 10, 10_000)], [0.1, 0.55, 0.99], rtol=1e-6
  )
  config.ema_warmup = False
  assert float(ema_decay(config, 0)) == pytest.approx(0.99)


def test_bfloat16_compute_trains_with_float32_state_and_tracks_float32(
  straight_run, celeba_dirs, tmp_path
):
  config = make_config(celeba_dirs)  # straight_run's config, in bfloat16
  config.model.dtype = 'bfloat16'
  history = train.train_diffusion(config, str(tmp_path))
  model = build_model(config.model, len(pipeline.attribute_names(config)))
  init_fn = functools.partial(initial_state, config, model, make_optimizer(config.train))
  state = checkpoints.load_state(str(tmp_path), init_fn)
  floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert {x.dtype for x in floats} == {np.dtype(np.float32)}  # params, Adam moments, EMA
  _, f32_history = straight_run
  bf16_loss = np.array([h['loss'] for h in history])
  f32_loss = np.array([h['loss'] for h in f32_history])
  # Same seeds, so the same noise and timesteps: only the compute precision differs. Measured
  # on this tiny config: under 0.005% apart over these 6 steps and 0.016% over 20 steps
  # (the model's output is still a small part of the loss), so 0.1% leaves a 6x margin.
  assert not np.array_equal(bf16_loss, f32_loss)  # bfloat16 did change the arithmetic ...
  np.testing.assert_allclose(bf16_loss, f32_loss, rtol=1e-3)  # ... by far less than training


def test_exact_resume_is_bitwise_identical(straight_run, celeba_dirs, tmp_path):
  workdir, history = straight_run
  resumed = str(tmp_path / 'resumed')
  first = train.train_diffusion(make_config(celeba_dirs, num_steps=3), resumed)
  second = train.train_diffusion(make_config(celeba_dirs, num_steps=6), resumed)
  assert [h['loss'] for h in first + second] == [h['loss'] for h in history]
  config = make_config(celeba_dirs)
  step_a, params_a, ema_a = final_params(workdir, config)
  step_b, params_b, ema_b = final_params(resumed, config)
  assert step_a == step_b == 6
  for a, b in zip(jax.tree.leaves((params_a, ema_a)), jax.tree.leaves((params_b, ema_b))):
    np.testing.assert_array_equal(a, b)


def test_loss_decreases_on_a_repeated_batch(celeba_dirs):
  config = make_config(celeba_dirs, learning_rate=2e-3, warmup_steps=1)
  config.model.dropout = 0.0
  mesh = parallel.create_mesh(jax.devices()[:1])
  model = build_model(config.model, 40)
  tx = make_optimizer(config.train)
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.timesteps)
  state = train.init_state(config, model, tx, mesh)
  batch = next(pipeline.create_train_iterator(config))
  step = jax.jit(
    lambda s, b: train.train_step(s, b, model=model, tx=tx, schedule=schedule, config=config)
  )
  losses = []
  for _ in range(40):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5]), losses


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(celeba_dirs, tmp_path):
  config = make_config(
    celeba_dirs, learning_rate=1e30, warmup_steps=1, grad_clip=1e30, checkpoint_every=1, num_steps=8
  )
  with pytest.raises(loop.TrainingDiverged, match='last good checkpoint'):
    train.train_diffusion(config, str(tmp_path))
  manager = checkpoints.checkpoint_manager(str(tmp_path))
  steps = manager.all_steps()
  manager.close()
  assert steps and max(steps) < 8
  step, params, _ = final_params(str(tmp_path), config)
  assert step == max(steps)
  # "Good" means its parameters still give a finite loss (those of the next step did not).
  model = build_model(config.model, 40)
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.timesteps)
  batch = next(pipeline.create_train_iterator(config, start_step=step))
  model_fn = lambda x, t, a: model.apply({'params': params}, x, t, a)
  loss = diffusion.diffusion_loss(
    model_fn, schedule, batch['image'], batch['attributes'], jax.random.key(0)
  )
  assert np.isfinite(float(loss))


def _run_fdiff(args, **kwargs):
  return subprocess.run(
    [sys.executable, '-m', 'fdiff_jax', *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    **kwargs,
  )


def test_unknown_config_key_is_one_clear_line_and_exit_2(tmp_path, capsys):
  code = cli.main(
    [
      'train',
      '--config',
      'configs/test.py',
      '--workdir',
      str(tmp_path),
      '--config.train.batch_sise=4',
    ]
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1
  assert 'batch_sise' in err[0] and 'batch_size' in err[0]


def test_bad_config_file_and_bad_value_are_errors(tmp_path, capsys):
  assert cli.main(['train', '--config', 'configs/nope.py', '--workdir', str(tmp_path)]) == 2
  assert (
    cli.main(
      [
        'train',
        '--config',
        'configs/test.py',
        '--workdir',
        str(tmp_path),
        '--config.train.batch_size=eight',
      ]
    )
    == 2
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 2 and 'nope.py' in err[0] and 'eight' in err[1]


@pytest.mark.parametrize(
  'overrides, expected',
  [
    (['train.batch_size=1.5'], "config.train.batch_size = '1.5' is not an integer"),
    (['data.random_flip=maybe'], "config.data.random_flip = 'maybe' is not true or false"),
    (['model.ch_mult=(1,2'], "config.model.ch_mult = '(1,2' is not a tuple"),
    (['train=1'], 'config.train is a ConfigDict'),
    (['seed.value=1'], 'config.seed is a single value (0)'),
    (['sample.sampler=euler'], 'config.sample.sampler'),
    (['train.lr_schedule=linear'], 'use one of constant, cosine'),
    (['model.dtype=float33'], 'not a dtype'),
    (['data.image_size=14', 'model.ch_mult=(1,2,2)'], 'divisible by 4'),
    (['model.num_heads=3'], 'num_heads = 3 must divide'),
    ([], 'needs config.data.manual_dir'),  # The data is checked before the workdir is made.
  ],
)
def test_config_mistakes_are_one_line_and_leave_no_workdir(tmp_path, capsys, overrides, expected):
  workdir = tmp_path / 'run'
  code = cli.main(
    [
      'train',
      '--config',
      'configs/test.py',
      '--workdir',
      str(workdir),
      *[f'--config.{o}' for o in overrides],
    ]
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1, err
  assert expected in err[0], err[0]
  assert not workdir.exists()


@pytest.mark.parametrize(
  'name',
  sorted(
    f[:-3]
    for f in os.listdir(os.path.join(REPO, 'configs'))
    if f.endswith('.py') and f != '__init__.py'
  ),
)
def test_every_config_validates_and_builds_its_model(name):
  config = config_utils.load_config(os.path.join(REPO, 'configs', f'{name}.py'))
  model = build_model(config.model, len(pipeline.attribute_names(config)))
  x = jax.ShapeDtypeStruct((2, *pipeline.image_shape(config)), np.float32)
  t = jax.ShapeDtypeStruct((2,), np.int32)
  a = jax.ShapeDtypeStruct((2, model.num_attributes), np.float32) if model.num_attributes else None
  variables = jax.eval_shape(model.init, jax.random.key(0), x, t, a)
  assert jax.eval_shape(model.apply, variables, x, t, a).shape == x.shape


def test_config_variants_load_from_any_directory(tmp_path):
  """`fdiff train --config configs/digits.py` must work outside the repo root too."""
  code = (
    'import sys; from fdiff_jax import config_utils; '
    'print(config_utils.load_config(sys.argv[1]).data.dataset)'
  )
  out = subprocess.run(
    [sys.executable, '-c', code, os.path.join(REPO, 'configs', 'digits.py')],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=120,
    env={k: v for k, v in os.environ.items() if k != 'PYTHONPATH'},
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == 'digits'


def test_config_round_trips_through_the_workdir(tmp_path):
  config = config_utils.load_config(
    'configs/test.py', ['model.ch_mult=(1,2,4)', 'train.learning_rate=3']
  )
  checkpoints.save_config(str(tmp_path), config)
  loaded = checkpoints.load_config(str(tmp_path))
  assert loaded.model.ch_mult == (1, 2, 4) and loaded.train.learning_rate == 3.0
  assert json.loads(config_utils.config_to_json(loaded)) == json.loads(
    config_utils.config_to_json(config)
  )


def test_config_overrides_parse_as_the_fields_type():
  config = config_utils.load_config(
    'configs/test.py',
    [
      'data.random_flip=false',
      'train.warmup_steps=7',
      'train.learning_rate=1e-3',
      'model.attn_resolutions=4',
      'sample.grid_prompts=Smiling,-Male',
      'sample.sampler=ddim',
    ],
  )
  assert config.data.random_flip is False and config.train.warmup_steps == 7
  assert config.train.learning_rate == 1e-3 and config.model.attn_resolutions == (4,)
  assert config.sample.grid_prompts == ('Smiling,-Male',) and config.sample.sampler == 'ddim'


DEVICES_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from configs import test as test_config
    from fdiff_jax import parallel, train
    from fdiff_jax.errors import UserError
    config = test_config.get_config()
    config.data.manual_dir, config.data.data_dir = sys.argv[1], sys.argv[2]
    config.train.num_steps = 3
    config.train.sample_every = 100
    losses = {}
    for n in (1, 4):
      mesh = parallel.create_mesh(jax.devices()[:n])
      history = train.train_diffusion(config, f'{sys.argv[3]}/{n}', mesh=mesh)
      losses[n] = [h['loss'] for h in history]
    config.train.batch_size = 6
    try:
      train.train_diffusion(config, sys.argv[3] + '/bad', mesh=parallel.create_mesh())
      error = None
    except UserError as e:
      error = str(e)
    print(json.dumps({'losses': losses, 'error': error}))
""")


def test_losses_do_not_depend_on_device_count(celeba_dirs, tmp_path):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu')
  out = subprocess.run(
    [sys.executable, '-c', DEVICES_SCRIPT, *celeba_dirs, str(tmp_path)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  losses = result['losses']
  assert len(losses['1']) == 3
  np.testing.assert_allclose(losses['4'], losses['1'], rtol=2e-5)
  assert 'batch size 6' in result['error'] and '4 devices' in result['error']


def test_sigterm_saves_a_restorable_checkpoint_and_exits_cleanly(celeba_dirs, tmp_path):
  workdir = str(tmp_path / 'w')
  args = [
    'train',
    '--config',
    'configs/test.py',
    '--workdir',
    workdir,
    f'--config.data.manual_dir={celeba_dirs[0]}',
    f'--config.data.data_dir={celeba_dirs[1]}',
    '--config.train.num_steps=100000',
    '--config.train.checkpoint_every=100000',
    '--config.train.sample_every=100000',
    '--config.train.log_every=1',
  ]
  steps = sigterm_after_first_loss(args, workdir)
  assert len(steps) == 1 and 0 < steps[0] < 100000
  step, _, _ = final_params(workdir, make_config(celeba_dirs))
  assert step == steps[0]


def test_cloud_workdirs_keep_their_url():
  """A gs:// workdir (multi-host on Cloud TPU) must not become a local path."""
  assert checkpoints.absolute('gs://bucket/run/checkpoints') == 'gs://bucket/run/checkpoints'
  assert checkpoints.absolute('runs/x') == os.path.join(os.getcwd(), 'runs', 'x')


def test_a_process_other_than_0_writes_only_checkpoints(celeba_dirs, tmp_path, monkeypatch):
  """Multi-host: logs, sample grids and the config come from process 0 alone."""
  monkeypatch.setattr(parallel, 'is_main_process', lambda: False)
  train.train_diffusion(
    make_config(celeba_dirs, num_steps=2, checkpoint_every=2, sample_every=2), str(tmp_path)
  )
  assert os.listdir(tmp_path) == ['checkpoints']
