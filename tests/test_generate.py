"""`fdiff sample / interpolate / edit` and `fdiff_jax.generate` on a real tiny trained workdir."""

import json
import os

import faces
import jax
import numpy as np
import pytest
from PIL import Image

from configs import digits as digits_config
from configs import test as test_config
from fdiff_jax import checkpoints, cli, generate, train
from fdiff_jax import sampler as sampler_lib
from fdiff_jax.data import synth_celeba
from fdiff_jax.errors import UserError

FAST = dict(sampler='ddim', steps=4)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A test-config model trained 300 steps (~1-2 min on 2 CPU cores, mostly compiling).

  300 rather than a handful of steps: an almost untrained model's ODE is so stiff that
  DDIM inversion barely inverts it, and the reconstruction test would measure nothing.
  """
  root = tmp_path_factory.mktemp('generate')
  config = faces.config_on(
    faces.synthetic_celeba(root, num=60),
    num_steps=300,
    learning_rate=2e-3,
    log_every=100,
    checkpoint_every=300,
    sample_every=300,
  )
  train.train_diffusion(config, str(root / 'workdir'))
  return str(root / 'workdir')


@pytest.fixture(scope='module')
def sampler(workdir):
  trained = checkpoints.load_model(workdir)
  return sampler_lib.Sampler(trained.config, trained.model, trained.params)


@pytest.fixture(scope='module')
def face(tmp_path_factory):
  """A 218x178 JPEG photo of a face the model never saw (a new identity)."""
  path = str(tmp_path_factory.mktemp('photo') / 'face.jpg')
  Image.fromarray(synth_celeba.render_face({'Smiling': True}, identity=1234)).save(path)
  return path


def attrs(config, text, num=1):
  return np.repeat(generate.attribute_vector(config, text)[None], num, axis=0)


def test_sample_cli_writes_sweep_grid_and_images_with_progress(workdir, tmp_path, capsys):
  code = cli.main(
    [
      'sample',
      '--workdir',
      workdir,
      '--attributes',
      '-Male',
      '--num',
      '3',
      '--guidance',
      '1,3',
      '--sampler',
      'ddim',
      '--steps',
      '4',
      '--batch-size',
      '2',
      '--out',
      str(tmp_path / 'grid.png'),
      '--out-dir',
      str(tmp_path / 'each'),
    ]
  )
  assert code == 0
  assert 'batch 2/2' in capsys.readouterr().err  # 3 images in batches of 2, per w.
  grid = np.asarray(Image.open(tmp_path / 'grid.png'))
  assert grid.shape == (2 * 18 + 2, 3 * 18 + 2, 3)  # 2 rows (w) x 3 columns of 16x16, pad 2.
  files = sorted(os.listdir(tmp_path / 'each'))
  assert files == [f'sample_{i:04d}.png' for i in range(6)]
  assert np.asarray(Image.open(tmp_path / 'each' / files[4])).shape == (16, 16, 3)
  np.testing.assert_array_equal(
    np.asarray(Image.open(tmp_path / 'each' / files[4])), grid[20:36, 20:36]
  )  # Row 1, column 1 of the grid.


def test_attributes_file_gives_a_row_per_line_and_checkpoint_step_picks_the_model(
  workdir, tmp_path
):
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('# one grid row per line\nMale\n\n-Male,Smiling\n')
  common = [
    'sample',
    '--workdir',
    workdir,
    '--num',
    '2',
    '--sampler',
    'ddim',
    '--steps',
    '4',
    '--batch-size',
    '2',
    '--guidance',
    '1,3',
  ]
  assert (
    cli.main(common + ['--attributes-file', str(prompts), '--out', str(tmp_path / 'rows.png')]) == 0
  )
  assert (
    cli.main(
      common
      + [
        '--attributes=-Male,Smiling',
        '--checkpoint-step',
        '300',
        '--out',
        str(tmp_path / 'one.png'),
      ]
    )
    == 0
  )
  rows, one = (np.asarray(Image.open(tmp_path / f)) for f in ('rows.png', 'one.png'))
  assert rows.shape == (4 * 18 + 2, 2 * 18 + 2, 3)  # (2 w) x (2 lines) rows of 2 images.
  row = lambda grid, r: grid[2 + 18 * r : 18 + 18 * r]
  assert np.abs(row(rows, 0).astype(int) - row(rows, 1)).max() > 0  # The lines differ.
  np.testing.assert_array_equal(row(rows, 1), row(one, 0))  # Line 2 at w=1,
  np.testing.assert_array_equal(row(rows, 3), row(one, 1))  # and at w=3.


def test_same_seed_same_images_other_seed_other_images(sampler):
  a = attrs(sampler.config, 'Smiling,Eyeglasses', 3)
  first = sampler.sample(a, seed=7, solver='dpm++', steps=4)
  again = sampler.sample(a, seed=7, solver='dpm++', steps=4)
  other = sampler.sample(a, seed=8, solver='dpm++', steps=4)
  assert first.shape == (3, 16, 16, 3) and first.dtype == np.float32
  np.testing.assert_array_equal(first, again)
  assert np.abs(first - other).mean() > 0.05
  assert np.abs(first[0] - first[1]).mean() > 0.05  # Columns get different noise.


def test_image_i_of_a_seed_does_not_depend_on_the_batching(sampler):
  a = attrs(sampler.config, 'Smiling', 5)
  whole = sampler.sample(a, seed=3, solver='ddim', steps=4)
  batched = sampler_lib.Sampler(sampler.config, sampler.model, sampler.params, batch_size=2)
  parts = batched.sample(a, seed=3, solver='ddim', steps=4)
  np.testing.assert_allclose(parts, whole, atol=1e-4)
  np.testing.assert_array_equal(batched.sample(a[:2], seed=3, solver='ddim', steps=4), parts[:2])
  np.testing.assert_array_equal(sampler.noise(3, 5)[2], sampler.noise(3, 3)[2])


def test_with_params_reuses_the_compiled_programs(sampler):
  a = attrs(sampler.config, 'Male', 2)
  sampler.sample(a, seed=0, solver='ddim', steps=3, guidance=2.0)
  size = sampler._sample_traced_w._cache_size()  # pylint: disable=protected-access
  zeros = jax.tree.map(lambda p: p * 0, sampler.params)  # Same devices, same placement.
  blank = sampler.with_params(zeros).sample(a, seed=0, solver='ddim', steps=3, guidance=2.0)
  assert sampler._sample_traced_w._cache_size() == size  # pylint: disable=protected-access
  assert sampler.with_params(zeros).params is zeros and sampler.params is not zeros
  assert (
    np.abs(blank - sampler.sample(a, seed=0, solver='ddim', steps=3, guidance=2.0)).mean() > 0.01
  )


def test_sweep_rows_are_plain_samples_with_the_same_noise(sampler):
  a = attrs(sampler.config, 'Male,Smiling')
  # DDIM with eta > 0 draws per-step noise too: rows share that as well.
  options = dict(solver='ddim', steps=4, eta=0.5)
  sweep = generate.guidance_sweep(sampler, a, [1.0, 3.0], num=3, seed=2, **options)
  assert sweep.shape == (2, 1, 3, 16, 16, 3)
  rows = np.repeat(a, 3, axis=0)
  for row, w in zip(sweep, [1.0, 3.0]):
    np.testing.assert_array_equal(row[0], sampler.sample(rows, seed=2, guidance=w, **options))
  assert np.abs(sweep[0] - sweep[1]).mean() > 1e-3  # w matters.
  # The w = 1 row is the conditional model alone; the guided formula at w = 1 agrees.
  options = sampler.options(**options)
  x_T, key = sampler.noise(2, 3), jax.random.fold_in(sampler_lib.seed_keys(2)[1], 0)
  # pylint: disable=protected-access
  conditional = sampler._sample_static_w(sampler.params, x_T, rows, key, w=1.0, options=options)
  both_branches = sampler._sample_traced_w(
    sampler.params, x_T, rows, key, w=np.ones(3, np.float32), options=options
  )
  np.testing.assert_allclose(sweep[0, 0], conditional, atol=1e-5)
  np.testing.assert_allclose(both_branches, conditional, atol=1e-4)


def test_interpolation_endpoints_equal_direct_samples(sampler):
  config = sampler.config
  start, end = attrs(config, '-Smiling,Male')[0], attrs(config, 'Smiling,Male')[0]
  batched = sampler_lib.Sampler(config, sampler.model, sampler.params, batch_size=4)
  options = dict(solver='ddim', steps=4, guidance=3.0)
  frames = generate.interpolate(batched, start, end, frames=4, seeds=[0, 5], **options)
  assert frames.shape == (2, 4, 16, 16, 3)
  for row, seed in zip(frames, [0, 5]):
    first = batched.sample(start[None], seed=seed, **options)
    last = batched.sample(end[None], seed=seed, **options)
    np.testing.assert_allclose(row[0], first[0], atol=1e-5)  # Other batches: float rounding.
    np.testing.assert_allclose(row[-1], last[0], atol=1e-5)
  assert np.abs(frames[0, 1] - frames[0, 0]).mean() > 1e-4  # The attributes do move.
  assert np.abs(frames[0] - frames[1]).mean() > 0.05  # Seeds are identities.


def test_interpolate_cli_writes_strip_and_gif(workdir, tmp_path):
  code = cli.main(
    [
      'interpolate',
      '--workdir',
      workdir,
      '--from',
      '-Smiling',
      '--to',
      'Smiling',
      '--frames',
      '5',
      '--seeds',
      '0,1',
      '--sampler',
      'dpm++',
      '--steps',
      '4',
      '--out',
      str(tmp_path / 'strip.png'),
      '--gif',
      str(tmp_path / 'anim.gif'),
    ]
  )
  assert code == 0
  assert np.asarray(Image.open(tmp_path / 'strip.png')).shape == (2 * 18 + 2, 5 * 18 + 2, 3)
  gif = Image.open(tmp_path / 'anim.gif')
  assert gif.n_frames == 5 and gif.size == (18 + 2, 2 * 18 + 2)  # Each frame: the seeds stacked.


def test_inversion_with_nothing_set_reconstructs_the_photo(sampler, face):
  image = generate.load_image(face, sampler.config)[None]
  source = attrs(sampler.config, 'Smiling')

  def error(steps):
    reconstruction, edited = generate.edit(
      sampler, image, source, source, method='inversion', steps=steps, guidance=1.0
    )
    np.testing.assert_allclose(reconstruction, edited, atol=1e-5)  # Nothing set: the same.
    return np.abs(reconstruction - image).mean()

  # DDIM inversion evaluates eps one grid point early, so the round trip is exact only
  # as the step shrinks: the error is first order in the step size. It runs up to
  # sampler.inversion_start (timestep 79 of this T=100 linear schedule, so 99 steps
  # means all 80). Measured on this model and photo (pixels in [-1, 1], mean absolute
  # error): 0.041 at 25 steps, 0.022 at 50, 0.012 at 80. Before inversion stopped at
  # inversion_start (to timestep 99) it was 0.065 at 99 steps, and wrong round trips
  # measured then: sampling back from fresh noise ~16, with x0 clipping 0.18, on a grid
  # of half the steps 0.11. The bound 0.03 leaves 2.5x for other CPUs' float
  # differences in the 300 training steps; a round trip whose error does not shrink
  # with the step (a grid mismatch) fails the 2x drop from 25 steps (measured 3.4x).
  fine, coarse = error(99), error(25)
  assert fine < 0.03, (fine, coarse)
  assert fine < coarse / 2, (fine, coarse)


def test_edit_cli_sdedit_writes_panel_and_changes_the_image(workdir, face, tmp_path):
  code = cli.main(
    [
      'edit',
      '--workdir',
      workdir,
      '--image',
      face,
      '--source',
      'Smiling',
      '--set',
      'Eyeglasses,-Smiling',
      '--method',
      'sdedit',
      '--strength',
      '0.6',
      '--steps',
      '10',
      '--out',
      str(tmp_path / 'panel.png'),
      '--out-dir',
      str(tmp_path / 'edits'),
    ]
  )
  assert code == 0
  panel = np.asarray(Image.open(tmp_path / 'panel.png')).astype(np.float32)
  assert panel.shape == (18 + 2, 3 * 18 + 2, 3)  # original | reconstruction | edit
  original, edited = panel[2:18, 2:18], panel[2:18, 38:54]
  np.testing.assert_array_equal(
    np.asarray(Image.open(tmp_path / 'edits' / 'edit_0000.png')), edited.astype(np.uint8)
  )
  assert np.abs(edited - original).mean() > 5  # Out of 255: noised to 60% of T, not a copy.


def test_edit_source_auto_reads_the_attributes_with_a_real_classifier(workdir, face, tmp_path):
  clf = str(tmp_path / 'clf')
  config = checkpoints.load_config(workdir)
  data = [
    f'--config.data.manual_dir={config.data.manual_dir}',
    f'--config.data.data_dir={config.data.data_dir}',
  ]
  assert (
    cli.main(
      [
        'train-classifier',
        '--config',
        'configs/test.py',
        '--workdir',
        clf,
        '--config.classifier.width=8',
        '--config.classifier.num_steps=2',
        *data,
      ]
    )
    == 0
  )
  code = cli.main(
    [
      'edit',
      '--workdir',
      workdir,
      '--image',
      face,
      '--source',
      'auto',
      '--classifier',
      clf,
      '--set',
      'Eyeglasses',
      '--steps',
      '4',
      '--out',
      str(tmp_path / 'panel.png'),
    ]
  )
  assert code == 0
  assert np.asarray(Image.open(tmp_path / 'panel.png')).shape == (18 + 2, 3 * 18 + 2, 3)


def test_interpolate_gif_alone_is_enough_output(workdir, tmp_path):
  assert (
    cli.main(
      [
        'interpolate',
        '--workdir',
        workdir,
        '--frames',
        '2',
        '--sampler',
        'dpm++',
        '--steps',
        '2',
        '--gif',
        str(tmp_path / 'a.gif'),
      ]
    )
    == 0
  )
  assert Image.open(tmp_path / 'a.gif').size == (18 + 2, 18 + 2)


def test_edit_source_auto_without_a_classifier_asks_for_source(workdir, face, tmp_path, capsys):
  code = cli.main(
    [
      'edit',
      '--workdir',
      workdir,
      '--image',
      face,
      '--source',
      'auto',
      '--out',
      str(tmp_path / 'p.png'),
    ]
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1
  assert '--source' in err[0] and 'train-classifier' in err[0]


@pytest.mark.parametrize(
  'args, expected',
  [
    (['sample', '--attributes', 'Smilling'], 'did you mean Smiling'),
    (['sample', '--attributes', '3,-7'], "40 attributes of dataset 'celeba'"),
    (['sample', '--guidance', '1,x'], 'comma-separated list of numbers'),
    (['sample', '--checkpoint-step', '7'], 'no checkpoint at step 7'),
    (['sample', '--attributes-file', 'missing.txt'], 'cannot read --attributes-file'),
    (['sample', '--num', 'many'], "argument --num: 'many' is not a whole number >= 1"),
    (['sample', '--guidance', '2,-1'], '>= 0'),
    (['sample', '--sampler', 'ddpm', '--steps', '10'], 'ddpm'),
    (['interpolate', '--sampler', 'ddpm'], 'deterministic sampler'),
    (['interpolate', '--frames', '1'], "argument --frames: '1' is not a whole number >= 2"),
    (['edit', '--image', 'missing.jpg'], 'cannot read image'),
    (['edit', '--image', __file__], 'cannot read image'),
    (['edit', '--image', 'FACE'], "give the photo's attributes with --source"),
    (['edit', '--image', 'FACE', '--source', '', '--method', 'blend'], 'unknown edit method'),
    (
      ['edit', '--image', 'FACE', '--source', '', '--method', 'sdedit', '--strength', '1.5'],
      'strength',
    ),
  ],
)
def test_user_errors_are_one_line_and_exit_2(workdir, face, tmp_path, capsys, args, expected):
  args = [face if a == 'FACE' else a for a in args]
  code = cli.main(args + ['--workdir', workdir, '--out', str(tmp_path / 'x.png')])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1, err
  assert expected in err[0], err[0]
  assert not os.path.exists(tmp_path / 'x.png')


def test_workdir_without_checkpoint_or_outputs_is_one_line_and_exit_2(workdir, tmp_path, capsys):
  empty = tmp_path / 'empty'
  empty.mkdir()
  with open(os.path.join(workdir, 'config.json')) as f:
    (empty / 'config.json').write_text(json.dumps(json.load(f)))
  assert cli.main(['sample', '--workdir', str(empty), '--out', str(tmp_path / 'x.png')]) == 2
  assert cli.main(['sample', '--workdir', str(tmp_path / 'nope'), '--out', 'x.png']) == 2
  assert cli.main(['sample', '--workdir', workdir]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 3
  assert 'no checkpoint' in err[0] and 'not a training workdir' in err[1]
  assert '--out' in err[2]


def test_attribute_vocabulary_and_conditioning_are_checked():
  digits = digits_config.get_config()
  with pytest.raises(UserError, match="10 attributes of dataset 'digits'"):
    generate.attribute_vector(digits, 'Smiling,-Male')
  np.testing.assert_array_equal(generate.attribute_vector(digits, '3'), np.eye(10)[3])
  with pytest.raises(UserError, match='do not fit this model'):
    sampler_lib.check_attributes(digits, np.zeros((2, 40)))
  digits.model.conditional = False
  with pytest.raises(UserError, match='unconditional'):
    generate.attribute_vector(digits, '3')
  assert not generate.attribute_vector(digits, '').any()


def test_inversion_stops_before_the_near_singular_end_of_the_schedule():
  config = test_config.get_config()
  for schedule, timesteps, expected in (('linear', 100, 79), ('cosine', 1000, 978)):
    config.diffusion.schedule, config.diffusion.timesteps = schedule, timesteps
    start = sampler_lib.inversion_start(config)
    alpha_bars = np.asarray(sampler_lib.config_schedule(config).alpha_bars)
    assert start == expected
    assert alpha_bars[start] >= sampler_lib.MIN_INVERSION_ALPHA_BAR > alpha_bars[start + 1]
    assert len(sampler_lib.config_schedule(config, start).alpha_bars) == start + 1


def test_exported_model_samples_like_its_workdir_and_damage_is_one_line(workdir, tmp_path, capsys):
  out = tmp_path / 'exported'
  assert cli.main(['export', '--workdir', workdir, '--out', str(out)]) == 0
  assert sorted(os.listdir(out)) == ['config.json', 'ema_params.msgpack']  # No optimizer state.
  source, exported = checkpoints.load_model(workdir), checkpoints.load_model(str(out))
  assert exported.step == source.step == 300
  jax.tree.map(np.testing.assert_array_equal, exported.params, source.params)
  common = ['sample', '--attributes', 'Smiling', '--num', '2', '--sampler', 'ddim', '--steps', '4']
  for name, model_dir in (('a.png', workdir), ('b.png', str(out))):
    assert cli.main(common + ['--workdir', model_dir, '--out', str(tmp_path / name)]) == 0
  a, b = (np.asarray(Image.open(tmp_path / name)) for name in ('a.png', 'b.png'))
  np.testing.assert_array_equal(a, b)

  capsys.readouterr()
  assert cli.main(['export', '--workdir', workdir, '--out', str(out)]) == 2  # Exists.
  assert 'already exists' in capsys.readouterr().err
  assert (
    cli.main(common + ['--workdir', str(out), '--checkpoint-step', '100', '--out', 'x.png']) == 2
  )
  assert 'step 300 only' in capsys.readouterr().err
  params = out / 'ema_params.msgpack'
  params.write_bytes(params.read_bytes()[:1000])  # Truncated.
  assert cli.main(common + ['--workdir', str(out), '--out', str(tmp_path / 'c.png')]) == 2
  err = capsys.readouterr().err
  assert 'is damaged' in err and len(err.strip().splitlines()) == 1
  assert not (tmp_path / 'c.png').exists()
