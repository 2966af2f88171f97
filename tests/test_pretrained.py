"""The model shipped in pretrained/synth-faces loads and samples with no dataset present."""

import os

import numpy as np
from PIL import Image

from fdiff_jax import checkpoints, cli

PRETRAINED = os.path.join(os.path.dirname(__file__), '..', 'pretrained', 'synth-faces')


def test_shipped_model_is_config_and_ema_parameters_only():
  shipped = set(os.listdir(PRETRAINED)) - {'eval_cache'}  # `fdiff evaluate` caches (gitignored).
  assert shipped == {'config.json', 'ema_params.msgpack'}
  assert os.path.getsize(os.path.join(PRETRAINED, 'ema_params.msgpack')) < 10 * 2**20
  loaded = checkpoints.load_model(PRETRAINED)
  assert loaded.config.model.conditional and loaded.config.data.image_size == 32


def test_shipped_model_samples_from_the_cli_without_the_dataset(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # Its config's manual_dir (data/synth_faces) does not exist here.
  out = tmp_path / 'faces.png'
  args = ['sample', '--workdir', PRETRAINED, '--attributes', 'Smiling,Eyeglasses', '--num', '2']
  assert cli.main(args + ['--sampler', 'ddim', '--steps', '3', '--out', str(out)]) == 0
  grid = np.asarray(Image.open(out))
  assert grid.shape == (2 + 34, 2 + 2 * 34, 3)  # One row of two 32x32 faces, 2-pixel gaps.
  faces = grid[2:34, 2:34], grid[2:34, 36:68]
  assert min(face.std() for face in faces) > 10  # Not blank.
  assert np.abs(faces[0].astype(int) - faces[1]).mean() > 5  # Two different people.
