"""`fdiff demo`: its engine's checks, the CLI's refusals, and the page driven in headless Chromium."""

import os
import shutil
import socket
import zipfile

import faces
import numpy as np
import pytest
from PIL import Image

from configs import digits as digits_config
from configs import test as test_config
from fdiff_jax import checkpoints, classifier, cli, generate, images, train
from fdiff_jax.data import synth_celeba
from fdiff_jax.data.attributes import CELEBA_ATTRIBUTES
from fdiff_jax.demo import browser, engine
from fdiff_jax.errors import UserError


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A test-config model trained 16 steps on 40 synthetic faces (~45 s, mostly compiling).

  A high learning rate and no EMA lag, so that its attributes already change the samples.
  """
  root = tmp_path_factory.mktemp('demo')
  config = faces.config_on(
    faces.synthetic_celeba(root, num=40),
    num_steps=16,
    learning_rate=3e-3,
    ema_decay=0.0,
    checkpoint_every=16,
    sample_every=16,
  )
  train.train_diffusion(config, str(root / 'workdir'))
  return str(root / 'workdir')


@pytest.fixture(scope='module')
def demo_engine(workdir):
  return engine.DemoEngine(workdir)


def test_attribute_groups_hold_each_celeba_attribute_once_and_digits_together():
  grouped = [name for _, names in engine.attribute_groups(CELEBA_ATTRIBUTES) for name in names]
  assert sorted(grouped) == sorted(CELEBA_ATTRIBUTES)
  some = engine.attribute_groups(('Smiling', 'Male', 'Eyeglasses'))
  assert some == [('Person', ('Male',)), ('Expression', ('Smiling',)),
                  ('Accessories and makeup', ('Eyeglasses',))]  # fmt: skip
  digits = tuple(str(d) for d in range(10))
  assert engine.attribute_groups(digits) == [('Digit', digits)]


def test_known_attributes_come_from_the_labels_else_from_the_data_folder(demo_engine):
  # The synthetic faces' labels: only drawn attributes vary, and the validation split exists.
  assert 'Male' in demo_engine.known
  assert set(demo_engine.known) <= set(synth_celeba.RENDERED_ATTRIBUTES)
  assert demo_engine.labels.eval_rows is not None
  assert set(demo_engine.random_real(np.random.default_rng(0))) <= set(engine.STATES)
  # Without labels: a synthetic CelebA folder means its 17 drawn attributes, else all 40.
  config = test_config.get_config()
  config.data.manual_dir = '/nonexistent/synth_faces'
  labels = engine.real_labels(config)
  assert labels.eval_rows is None
  known, _ = engine.known_attributes(config, labels)
  assert sorted(known) == sorted(synth_celeba.RENDERED_ATTRIBUTES)
  config.data.manual_dir = '/nonexistent/celeba'
  assert engine.known_attributes(config, labels)[0] == CELEBA_ATTRIBUTES
  digits = digits_config.get_config()
  labels = engine.real_labels(digits)
  assert labels.eval_rows.shape == (219, 10) and (labels.eval_rows.sum(1) == -8).all()
  assert engine.known_attributes(digits, labels)[0] == tuple(str(d) for d in range(10))


@pytest.mark.parametrize(
  'call, expected',
  [
    (lambda e, s: e.sample(s, num='abc', guidance=2, solver='ddim', steps=4, seed=0), 'number of images'),
    (lambda e, s: e.sample(s, num=9, guidance=2, solver='ddim', steps=4, seed=0), 'from 1 to 8'),
    (lambda e, s: e.sample(s, num=2, guidance=None, solver='ddim', steps=4, seed=0), 'guidance w'),
    (lambda e, s: e.sample(s, num=2, guidance='nan', solver='ddim', steps=4, seed=0), 'guidance w'),
    (lambda e, s: e.sample(s, num=2, guidance=2, solver='euler', steps=4, seed=0), 'sampler'),
    (lambda e, s: e.sample(s, num=2, guidance=2, solver='ddim', steps=2.5, seed=0), 'steps'),
    (lambda e, s: e.sample(s, num=2, guidance=2, solver='ddim', steps=4, seed=-1), 'seed'),
    (lambda e, s: e.sample(s[:-1], num=2, guidance=2, solver='ddim', steps=4, seed=0), 'settings'),
    (lambda e, s: e.interpolate(s, s, frames=1, guidance=2, solver='ddim', steps=4, seed=0), 'frames'),
    (lambda e, s: e.interpolate(s, s, frames=4, guidance=2, solver='ddpm', steps=4, seed=0), 'sampler'),
    (lambda e, s: e.load_photo(None), 'upload a photo'),
    (lambda e, s: e.read_attributes(None), '--classifier'),
  ],
)  # fmt: skip
def test_bad_values_from_the_page_are_one_line_user_errors(demo_engine, call, expected):
  states = ['any'] * len(demo_engine.known)
  with pytest.raises(UserError, match=expected) as error:
    call(demo_engine, states)
  assert '\n' not in str(error.value)


def test_photos_that_are_not_images_or_too_small_are_refused(demo_engine, tmp_path):
  (tmp_path / 'notes.txt').write_text('not a photo')
  Image.new('RGB', (8, 8)).save(tmp_path / 'tiny.png')
  with pytest.raises(UserError, match='cannot read image'):
    demo_engine.load_photo(tmp_path / 'notes.txt')
  with pytest.raises(UserError, match='8x8 pixels, smaller than'):
    demo_engine.load_photo(tmp_path / 'tiny.png')


@pytest.mark.parametrize('flag', ['--workdir', '--classifier', '--port'])
def test_cli_refuses_a_bad_workdir_or_port_before_serving(workdir, tmp_path, capsys, flag):
  with socket.socket() as taken:
    taken.bind(('127.0.0.1', 0))
    value = str(taken.getsockname()[1]) if flag == '--port' else str(tmp_path / 'missing')
    assert cli.main(['demo', '--workdir', workdir, flag, value]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('fdiff: error:') and value in err[0]


def test_cli_refuses_a_port_out_of_range(workdir, capsys):
  assert cli.main(['demo', '--workdir', workdir, '--port', '99999']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'not a port number' in err[0], err


def test_edit_reads_the_photo_with_the_workdirs_classifier_and_changes_it(workdir, tmp_path):
  """A classifier in WORKDIR/classifier is found without --classifier; the edit is a panel."""
  model = tmp_path / 'model'
  shutil.copytree(workdir, model)
  config = checkpoints.load_config(str(model))
  config.classifier.update(num_steps=2, batch_size=4, checkpoint_every=2, log_every=1)
  classifier.train_classifier(config, generate.classifier_dir(str(model)))
  with zipfile.ZipFile(os.path.join(config.data.manual_dir, 'img_align_celeba.zip')) as archive:
    name = next(n for n in archive.namelist() if n.endswith('.jpg'))
    (tmp_path / 'face.jpg').write_bytes(archive.read(name))

  demo = engine.DemoEngine(str(model))
  assert demo.classifier == generate.classifier_dir(str(model))
  source = demo.read_attributes(tmp_path / 'face.jpg')
  assert len(source) == len(demo.known) and set(source) <= {'yes', 'no'}
  changes = ['any'] * len(demo.known)
  changes[demo.known.index('Male')] = 'no' if source[demo.known.index('Male')] == 'yes' else 'yes'
  photo = demo.load_photo(tmp_path / 'face.jpg')
  for method in engine.EDIT_METHODS:
    panel = demo.edit(
      photo, source, changes, method=method, strength=0.6, guidance=2, steps=4, seed=0
    )
    size, scale = demo.image_shape[0], demo.scale  # Square images, 2 pixels of padding.
    assert panel.shape == ((size + 4) * scale, (3 * size + 8) * scale, 3), method
    rows = panel[2 * scale : (size + 2) * scale]
    original, reconstruction, edited = (
      rows[:, (2 + k * (size + 2)) * scale : (2 + k * (size + 2) + size) * scale] for k in range(3)
    )
    assert (original == demo.enlarge(images.to_uint8(photo[0]))).all(), method
    assert (edited != reconstruction).any(), method


def test_page_samples_interpolates_and_reports_bad_input_in_headless_chromium(
  workdir, demo_engine, tmp_path
):
  reason = browser.missing()
  if reason:
    pytest.skip(f'no headless browser: {reason}')
  pytest.importorskip('gradio', reason='the demo needs gradio (pip install -e ".[test]")')
  env = dict(
    os.environ, FDIFF_CACHE=str(tmp_path / 'cache'), GRADIO_TEMP_DIR=str(tmp_path / 'gradio')
  )
  from selenium.webdriver.support.ui import WebDriverWait

  known = demo_engine.known
  side = 16 * 8  # The test config's 16x16 images, enlarged 8x for display.
  cell = 18 * 8  # An image and its grid padding.
  server = browser.DemoServer(workdir, env=env)
  try:
    page = browser.DemoPage(server.url)
    try:
      page.set_attribute('sample', 'Male', 'yes')
      _, src, width, height = page.generate('sample-generate', 'sample-output')
      assert (width, height) == (4 * cell + 16, side + 32)  # 4 images in a row.
      male = browser.pixels(page.fetch(src))
      page.set_attribute('sample', 'Male', 'no')
      female = browser.pixels(page.fetch(page.generate('sample-generate', 'sample-output')[1]))
      assert female.shape == male.shape and (female != male).mean() > 0.02
      page.set_attribute('sample', 'Male', 'yes')
      again = browser.pixels(page.fetch(page.generate('sample-generate', 'sample-output')[1]))
      assert (again == male).all()  # Same seed and settings: the same images.
      assert page.status('sample-status').startswith('done in')
      page.click('sample-real')  # Every drawn attribute of a real face is present or absent.
      settings = lambda _: {page.attribute('sample', name) for name in known}
      assert WebDriverWait(page.driver, 30).until(lambda d: settings(d) <= {'yes', 'no'})

      page.tab('Interpolate')
      page.set_attribute('from', 'Male', 'no')
      page.set_attribute('to', 'Male', 'yes')
      _, src, width, height = page.generate('interp-generate', 'interp-strip')
      assert (width, height) == (8 * cell + 16, side + 32)  # 8 frames by default.
      gif = page.fetch(page.wait_for_image('interp-gif')[0])
      assert gif.format == 'GIF' and gif.n_frames == 8 and gif.size == (side + 32, side + 32)

      page.tab('Edit')
      (tmp_path / 'notes.txt').write_text('not a photo')
      page.upload('edit-photo', tmp_path / 'notes.txt')
      page.click('edit-generate')
      assert 'cannot read image' in page.wait_for_status('edit-status', 'Error')
      assert server.process.poll() is None  # The server lives on.
    finally:
      page.close()
  finally:
    server.stop()
  assert server.process.returncode is not None
