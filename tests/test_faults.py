"""Fault injection: damaged data, checkpoints and weights, config and flag mistakes, races.

Each case must end in one clear line and exit code 2, or recover by itself where
docs/robustness.md says so; never a traceback, a hang, a crash or silent damage.
One tiny model is trained once for the module; tests damage copies of it.
"""

import fcntl
import os
import shutil
import struct
import time
import zipfile

import faces
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_inception import Crafted, storage, write_pth

from fdiff_jax import checkpoints, classifier, cli, config_utils, images, loop, train
from fdiff_jax.data import prepared, sources
from fdiff_jax.data.synth_celeba import write_synthetic_celeba
from fdiff_jax.errors import UserError
from fdiff_jax.metrics import inception, torch_state_dict


def one_line_error(capsys):
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  return err[0]


@pytest.fixture(scope='module')
def celeba(tmp_path_factory):
  return faces.synthetic_celeba(tmp_path_factory.mktemp('faults'), num=20)


def make_config(celeba, **train):
  return faces.config_on(
    celeba, **{'num_steps': 4, 'checkpoint_every': 2, 'sample_every': 4, **train}
  )


def train_args(celeba, workdir, *overrides):
  return [
    'train',
    '--config',
    'configs/test.py',
    '--workdir',
    str(workdir),
    f'--config.data.manual_dir={celeba[0]}',
    f'--config.data.data_dir={celeba[1]}',
    *[f'--config.{o}' for o in overrides],
  ]


@pytest.fixture(scope='module')
def trained(celeba, tmp_path_factory):
  """A workdir with checkpoints 2 and 4 of the tiny test model."""
  workdir = str(tmp_path_factory.mktemp('trained') / 'run')
  train.train_diffusion(make_config(celeba), workdir)
  return workdir


def copy_of(workdir, tmp_path):
  target = str(tmp_path / 'run')
  shutil.copytree(workdir, target)
  return target


def biggest_file(step_dir):
  files = [os.path.join(d, f) for d, _, names in os.walk(step_dir) for f in names]
  return max(files, key=os.path.getsize)


def truncate(path):
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[: len(data) // 3])


def overwrite_in_place(path):
  """The same size, some bytes in the middle replaced by 0xFF (NaN as float32)."""
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(b'\xff' * 64)


# 1. Damaged CelebA files: refused at preparation, naming the member.


def damaged_celeba(tmp_path, damage):
  """A copy of a 6-image synthetic CelebA whose zip `damage(zip_path)` changes."""
  files = str(tmp_path / 'files')
  write_synthetic_celeba(files, num=6, seed=1)
  damage(os.path.join(files, 'img_align_celeba.zip'))
  return files, str(tmp_path / 'tfds')


def cut_member(zip_path, member='img_align_celeba/000002.jpg'):
  with zipfile.ZipFile(zip_path) as archive:
    contents = {name: archive.read(name) for name in archive.namelist()}
  contents[member] = contents[member][: len(contents[member]) // 3]
  with zipfile.ZipFile(zip_path, 'w') as archive:
    for name, data in contents.items():
      archive.writestr(name, data)


def flip_member_bytes(zip_path, member='img_align_celeba/000003.jpg'):
  """The same size; bytes in the middle of one member's data changed (its CRC no longer fits)."""
  with zipfile.ZipFile(zip_path) as archive:
    info = archive.getinfo(member)
  with open(zip_path, 'r+b') as f:
    f.seek(info.header_offset + 26)
    name_length, extra_length = struct.unpack('<HH', f.read(4))
    f.seek(info.header_offset + 30 + name_length + extra_length + info.compress_size // 2)
    f.write(bytes(255 - b for b in f.read(8)))


@pytest.mark.parametrize(
  'damage, expected',
  [
    (cut_member, 'img_align_celeba/000002.jpg in '),
    (flip_member_bytes, 'img_align_celeba/000003.jpg'),
    (truncate, 'is not a readable zip file'),
  ],
)
def test_damaged_celeba_zip_is_refused_before_training(tmp_path, capsys, damage, expected):
  data = damaged_celeba(tmp_path, damage)
  workdir = tmp_path / 'run'
  assert cli.main(train_args(data, workdir)) == 2
  assert expected in one_line_error(capsys)
  assert not workdir.exists()
  leftovers = [p for p in (tmp_path / 'tfds').rglob('*') if 'fdiff_prepared' not in str(p)]
  assert not leftovers, leftovers  # Nothing kept, not even TFDS's empty download folders.


def test_an_undecodable_stored_image_is_one_line_and_nothing_is_prepared(celeba, tmp_path):
  config = make_config(celeba)
  folder = tmp_path / 'prepared'
  folder.mkdir()
  example = {'image': b'not a jpeg', 'attributes': np.ones(40, np.float32)}
  bad = sources.Split([example] * 3, lambda e: e['attributes'])
  with pytest.raises(UserError, match='cannot be decoded'):
    prepared._prepare(bad, config, str(folder))  # pylint: disable=protected-access
  assert not (folder / 'attributes.npy').exists()  # Only written once every image decoded.


# 2. Damaged checkpoints: detected, named, and skipped by training.


def test_every_committed_step_has_a_manifest_that_verifies(trained):
  manager = checkpoints.checkpoint_manager(trained)
  try:
    assert sorted(manager.all_steps()) == [2, 4]
    assert all(checkpoints.verify_files(manager, step) for step in (2, 4))
  finally:
    manager.close()


@pytest.mark.parametrize('damage', [truncate, overwrite_in_place])
def test_sampling_from_a_damaged_step_names_it_and_the_way_out(trained, tmp_path, capsys, damage):
  workdir = copy_of(trained, tmp_path)
  damage(biggest_file(os.path.join(workdir, 'checkpoints', '4')))
  out = tmp_path / 'grid.png'
  assert cli.main(['sample', '--workdir', workdir, '--out', str(out), '--num', '1']) == 2
  line = one_line_error(capsys)
  assert 'checkpoint 4' in line and 'damaged' in line and '--checkpoint-step' in line, line
  assert 'steps: 2' in line and not out.exists()
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '4'))  # Sampling moves nothing.


def test_a_truncated_step_without_a_manifest_is_still_caught(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  step_dir = os.path.join(workdir, 'checkpoints', '4')
  os.remove(os.path.join(step_dir, checkpoints.MANIFEST_FILE))  # As if saved by older code.
  truncate(biggest_file(step_dir))  # orbax raises a bare Exception here.
  with pytest.raises(UserError, match='checkpoint 4 .* damaged'):
    checkpoints.load_model(workdir)


def test_a_committed_step_is_sealed_before_the_next_save(celeba, tmp_path, monkeypatch):
  """A kill -9 between two saves must find the newest committed step with its manifest."""
  step_dir = tmp_path / 'run' / 'checkpoints' / '3'
  sealed = []
  run = loop.run

  def watched_run(*args, on_step, **kwargs):
    def watch(step, state):
      if step == 4:  # Let the asynchronous save of step 3 commit (its folder appears).
        deadline = time.time() + 60
        while not step_dir.is_dir() and time.time() < deadline:
          time.sleep(0.05)
        time.sleep(1.0)
      elif step == 5:  # Step 6 saves next; the manifest must not wait for it.
        sealed.append((step_dir / checkpoints.MANIFEST_FILE).exists())
      on_step(step, state)

    return run(*args, on_step=watch, **kwargs)

  monkeypatch.setattr(loop, 'run', watched_run)
  config = make_config(celeba, num_steps=6, checkpoint_every=3, sample_every=6)
  train.train_diffusion(config, str(tmp_path / 'run'))
  assert sealed == [True]


@pytest.mark.parametrize('damage', [truncate, overwrite_in_place])
def test_training_sets_a_damaged_step_aside_and_resumes_from_the_one_before(
  celeba, trained, tmp_path, caplog, damage
):
  workdir = copy_of(trained, tmp_path)
  assert os.path.exists(os.path.join(workdir, checkpoints.LOCK_FILE))  # Left by the first run.
  damage(biggest_file(os.path.join(workdir, 'checkpoints', '4')))
  history = train.train_diffusion(make_config(celeba, checkpoint_every=100), workdir)
  assert [h['step'] for h in history] == [3, 4]  # Resumed from step 2.
  assert os.path.isdir(os.path.join(workdir, checkpoints.DAMAGED_DIR, '4'))
  assert any('checkpoint 4' in r.message and 'moved it to' in r.message for r in caplog.records)
  assert checkpoints.load_model(workdir).step == 4  # A fresh, verified step 4.


@pytest.mark.parametrize(
  'fault, expected',
  [
    (MemoryError(), 'could not be read on this machine'),
    (ValueError('unexpected'), 'matches its checksums but cannot be restored'),
  ],
)
def test_a_restore_failure_that_is_not_damage_moves_nothing(
  celeba, trained, tmp_path, monkeypatch, fault, expected
):
  workdir = copy_of(trained, tmp_path)

  def fail(*args, **kwargs):
    raise fault

  monkeypatch.setattr(ocp.CheckpointManager, 'restore', fail)
  with pytest.raises(UserError, match=expected) as error:
    train.train_diffusion(make_config(celeba, num_steps=6), workdir)
  assert not isinstance(error.value, checkpoints.DamagedCheckpoint)
  assert not os.path.exists(os.path.join(workdir, checkpoints.DAMAGED_DIR))
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '4'))


def test_the_exported_form_still_reports_damage_in_one_line(trained, tmp_path, capsys):
  out = str(tmp_path / 'export')
  assert cli.main(['export', '--workdir', trained, '--out', out]) == 0
  truncate(os.path.join(out, checkpoints.EXPORT_FILE))
  capsys.readouterr()
  assert cli.main(['sample', '--workdir', out, '--out', str(tmp_path / 'g.png')]) == 2
  assert 'is damaged' in one_line_error(capsys)


# 4./5. Config mistakes up front; what is really wrong, not "delete it".


@pytest.mark.parametrize(
  'override, expected',
  [
    ("sample.grid_prompts=('Smiling','Wings')", "grid_prompts has 'Wings'"),
    ('sample.steps=500', 'sample.steps = 500 must be at most config.diffusion.timesteps'),
    ('train.checkpoint_every=0', 'checkpoint_every = 0 must be at least 1'),
    ('train.keep_checkpoints=0', 'keep_checkpoints = 0 must be at least 1'),
    ('model.ch_mult=()', 'ch_mult = () must be one or more'),
  ],
)
def test_config_mistakes_are_refused_before_the_workdir_exists(
  tmp_path, capsys, override, expected
):
  workdir = tmp_path / 'run'
  assert cli.main(train_args(('', ''), workdir, override)) == 2
  assert expected in one_line_error(capsys)
  assert not workdir.exists()


def test_train_classifier_without_a_dataset_leaves_no_workdir(tmp_path, capsys):
  workdir = tmp_path / 'clf'
  args = ['train-classifier', '--config', 'configs/test.py', '--workdir', str(workdir)]
  assert cli.main(args) == 2
  assert 'manual_dir' in one_line_error(capsys)
  assert not workdir.exists()


def test_resuming_with_another_model_shape_says_the_config_differs(
  celeba, trained, tmp_path, capsys
):
  workdir = copy_of(trained, tmp_path)
  before = sorted(os.listdir(workdir))
  assert cli.main(train_args(celeba, workdir, 'model.ch=8')) == 2
  line = one_line_error(capsys)
  assert 'config differs' in line and 'config.json' in line and 'delete' not in line, line
  assert sorted(os.listdir(workdir)) == before  # Nothing written.


def test_a_diffusion_workdir_given_as_classifier_is_named_as_such(trained):
  with pytest.raises(UserError, match='holds a diffusion model, not an attribute classifier'):
    classifier.load_classifier(trained)


def test_a_classifier_workdir_given_to_a_sampler_is_named_as_such(celeba, tmp_path, capsys):
  config = make_config(celeba)
  config.classifier.update(num_steps=2, batch_size=4, checkpoint_every=2, log_every=1)
  workdir = str(tmp_path / 'clf')
  classifier.train_classifier(config, workdir)
  assert cli.main(['sample', '--workdir', workdir, '--out', str(tmp_path / 'g.png')]) == 2
  line = one_line_error(capsys)
  assert 'holds an attribute classifier, not a diffusion model' in line, line


# 3. Crafted FID weights.


def test_crafted_pth_files_are_refused_without_reading_past_their_storage(tmp_path, monkeypatch):
  path = str(tmp_path / 'w.pth')
  write_pth(path, {'a': np.arange(12, dtype=np.float32).reshape(3, 4)}, monkeypatch)
  with zipfile.ZipFile(path) as archive:
    contents = {name: archive.read(name) for name in archive.namelist()}

  def rewrite(name, data):
    with zipfile.ZipFile(name, 'w') as archive:
      for member, payload in data.items():
        archive.writestr(member, payload)

  short = str(tmp_path / 'short.pth')  # The tensor claims 12 floats, the storage holds 2.
  rewrite(short, {**contents, 'archive/data/0': contents['archive/data/0'][:8]})
  with pytest.raises(ValueError, match='reaches element 11 of a storage of 2'):
    torch_state_dict.load_state_dict(short)
  missing = str(tmp_path / 'missing.pth')
  rewrite(missing, {k: v for k, v in contents.items() if k != 'archive/data/0'})
  for bad in (short, missing):
    with pytest.raises(UserError, match='cannot read Inception weights'):
      inception.load_variables(bad)


def test_a_truncated_legacy_pth_is_a_value_error(tmp_path, monkeypatch):
  path = str(tmp_path / 'legacy.pth')
  write_pth(path, {'a': np.ones((64,), np.float32)}, monkeypatch, legacy=True)
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:-100])
  with pytest.raises(ValueError, match='truncated'):
    torch_state_dict.load_state_dict(path)


def test_a_legacy_storage_claiming_more_bytes_than_the_file_is_refused(tmp_path, monkeypatch):
  path = str(tmp_path / 'legacy.pth')
  write_pth(path, {'a': np.ones((3,), np.float32)}, monkeypatch, legacy=True)
  with open(path, 'rb') as f:
    data = f.read()
  header = struct.pack('<q', 3)
  assert data.count(header) == 1
  with open(path, 'wb') as f:  # 2**62 floats: 16 EiB, more than any read could return.
    f.write(data.replace(header, struct.pack('<q', 2**62)))
  with pytest.raises(UserError, match='truncated or malformed at storage'):
    inception.load_variables(path)


@pytest.mark.parametrize(
  'entry, expected',
  [
    (lambda s: Crafted(5, 0, (3,), (1,)), 'names 5 as its storage'),
    (lambda s: Crafted(('0', 'float32'), 0, (3,), (1,)), 'as its storage, not a storage'),
    (lambda s: Crafted(s, 0, 3.0, (1,)), 'malformed layout'),
    (lambda s: Crafted(s, -1, (3,), (1,)), 'malformed layout'),
    (lambda s: Crafted(s, 5, (1,), (1,)), 'reaches element 5 of a storage of 3'),
    (lambda s: Crafted(s, 0, (2,), (10**18,)), 'reaches element 1000000000000000000'),
    (lambda s: Crafted(s, 0, (10**20,), (1,)), 'reaches element'),
    (lambda s: Crafted(s, 0, (10**9, 10**9), (0, 0)), 'more elements than its storage of 3'),
  ],
)
def test_crafted_tensor_layouts_are_one_line(tmp_path, monkeypatch, entry, expected):
  path = str(tmp_path / 'w.pth')
  write_pth(path, {'a': entry(storage('0', np.zeros(3, np.float32)))}, monkeypatch)
  with pytest.raises(UserError, match=f'cannot read Inception weights.*{expected}'):
    inception.load_variables(path)


def test_a_truncated_npz_is_one_line(tmp_path):
  path = tmp_path / 'w.npz'
  np.savez(path, a=np.ones(1000, np.float32))
  path.write_bytes(path.read_bytes()[:-300])
  with pytest.raises(UserError, match='Inception weights .* is damaged \\(BadZipFile'):
    inception.load_variables(str(path))


# 6. Output paths, checked before any work; no temporaries left.


@pytest.fixture
def a_file(tmp_path):
  path = tmp_path / 'file.txt'
  path.write_text('x')
  return str(path)


@pytest.mark.parametrize(
  'flags, expected',
  [
    (['--out', '{file}/grid.png'], 'which is a file'),
    (['--out', '{tmp}'], 'is a folder'),
    (['--out-dir', '{file}/pngs'], 'which is a file'),
    (['--out-dir', '{file}'], 'is a file; give a folder'),
  ],
)
def test_unwritable_sample_outputs_are_refused_before_sampling(
  tmp_path, a_file, capsys, flags, expected
):
  flags = [f.format(file=a_file, tmp=tmp_path) for f in flags]
  # No such workdir: the outputs are checked before the model is even loaded.
  assert cli.main(['sample', '--workdir', str(tmp_path / 'none'), *flags]) == 2
  assert expected in one_line_error(capsys)


def test_gif_and_report_folder_are_checked_first_too(tmp_path, a_file, capsys):
  missing = str(tmp_path / 'none')
  gif = ['interpolate', '--workdir', missing, '--gif', f'{a_file}/a.gif']
  assert cli.main(gif) == 2
  assert '--gif' in one_line_error(capsys)
  report = ['evaluate', '--workdir', missing, '--classifier', missing]
  for out_dir, expected in ((a_file, 'is a file; give a folder'), (f'{a_file}/sub', 'a file;')):
    assert cli.main([*report, '--out-dir', out_dir]) == 2
    line = one_line_error(capsys)
    assert '--out-dir' in line and expected in line, line


def test_two_outputs_on_one_path_are_refused(tmp_path, capsys):
  same = str(tmp_path / 'out')
  assert cli.main(['sample', '--workdir', 'x', '--out', same, '--out-dir', same]) == 2
  assert '--out-dir and --out are both' in one_line_error(capsys)
  assert not os.path.exists(same)


def test_a_folder_without_write_permission_is_refused(tmp_path, capsys, monkeypatch):
  locked = tmp_path / 'locked'
  locked.mkdir(mode=0o500)
  if os.geteuid() == 0:  # Root may write anywhere: let the permission check see a locked folder.
    access = os.access
    monkeypatch.setattr(
      os, 'access', lambda p, *a, **k: str(p) != str(locked) and access(p, *a, **k)
    )
  assert cli.main(['sample', '--workdir', 'x', '--out', str(locked / 'a.png')]) == 2
  assert 'no permission' in one_line_error(capsys)


def test_a_failed_write_leaves_no_temporary(tmp_path):
  target = tmp_path / 'taken'
  target.mkdir()  # The final rename onto a folder fails after the temporary was written.
  with pytest.raises(UserError, match='cannot write'):
    images.save_png(str(target), np.zeros((4, 4, 3), np.uint8))
  assert sorted(os.listdir(tmp_path)) == ['taken']


# 7. Numeric flags, one check per flag for every command.


@pytest.mark.parametrize(
  'args, flag',
  [
    (['sample', '--scale', '0'], '--scale'),
    (['sample', '--scale', '-2'], '--scale'),
    (['sample', '--num', '-5'], '--num'),
    (['sample', '--steps', '0'], '--steps'),
    (['interpolate', '--guidance', 'nan'], '--guidance'),
    (['interpolate', '--guidance', '-1'], '--guidance'),
    (['edit', '--image', 'x.png', '--guidance', 'nan'], '--guidance'),
    (['edit', '--image', 'x.png', '--strength', '0'], '--strength'),
    (['interpolate', '--frames', '1'], '--frames'),
  ],
)
def test_bad_numbers_are_refused_by_the_flag_parser(capsys, args, flag):
  assert cli.main([*args, '--workdir', 'w', '--out', 'o.png']) == 2
  line = one_line_error(capsys)
  assert f'argument {flag}' in line, line


@pytest.mark.parametrize('batch', ['-4', '0'])
def test_bench_batch_must_be_positive(capsys, batch):
  assert cli.main(['bench', '--config', 'configs/test.py', '--batch', batch]) == 2
  assert 'argument --batch' in one_line_error(capsys)


# 8. One trainer per workdir.


def test_a_second_trainer_on_a_locked_workdir_is_refused(celeba, tmp_path, capsys):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  with open(workdir / checkpoints.LOCK_FILE, 'w') as held:  # Another run holds it.
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    held.write('pid 12345')
    held.flush()
    assert cli.main(train_args(celeba, workdir)) == 2
  line = one_line_error(capsys)
  assert 'in use by another training run' in line and 'pid 12345' in line, line
  assert os.listdir(workdir) == [checkpoints.LOCK_FILE]


# 10. A catalog dataset without a network.


def test_an_unprepared_tfds_dataset_offline_fails_at_once(tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(sources, 'TFDS_DOWNLOAD_HOST', ('127.0.0.1', 9))  # Nothing listens.
  config = config_utils.load_config('configs/mnist.py', [f'data.data_dir={tmp_path}'])
  with pytest.raises(UserError, match='needs a network'):
    sources.open_split(config, 'train')
  assert not [r.getMessage() for r in caplog.records]  # The error line is all the user sees.
