"""XLA:CPU flags and glibc tunables that `fdiff` sets at start-up, leaving the user's own alone."""

import json
import os
import subprocess
import sys

import pytest

from fdiff_jax import cpu_runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = cpu_runtime.XLA_CPU_FLAGS[(0, 10)][0]


def test_xla_flags_added_for_measured_jaxlib_only():
  assert cpu_runtime.with_default_xla_flags('', (0, 10)) == OURS
  assert (
    cpu_runtime.with_default_xla_flags('--xla_dump_to=/tmp/d', (0, 10))
    == f'--xla_dump_to=/tmp/d {OURS}'
  )
  assert cpu_runtime.with_default_xla_flags('--a=1', (0, 4)) == '--a=1'  # Unknown flag there.
  assert cpu_runtime.with_default_xla_flags('--a=1', None) == '--a=1'


def test_users_own_xla_flag_value_is_kept():
  mine = '--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE'
  assert cpu_runtime.with_default_xla_flags(mine, (0, 10)) == mine


def test_huge_pages_tunable_added_unless_user_set_hugetlb():
  assert cpu_runtime.with_huge_pages('') == 'glibc.malloc.hugetlb=1'
  assert (
    cpu_runtime.with_huge_pages('glibc.malloc.check=0')
    == 'glibc.malloc.check=0:glibc.malloc.hugetlb=1'
  )
  assert cpu_runtime.with_huge_pages('glibc.malloc.hugetlb=0') == 'glibc.malloc.hugetlb=0'


@pytest.mark.skipif(not cpu_runtime._glibc(), reason='glibc tunables only')  # pylint: disable=protected-access
def test_command_runs_with_the_settings_and_keeps_the_users(tmp_path):
  out = tmp_path / 'bench.json'
  env = dict(
    os.environ,
    GLIBC_TUNABLES='glibc.malloc.trim_threshold=1000000000',
    XLA_FLAGS='--xla_force_host_platform_device_count=1',
    JAX_PLATFORMS='cpu',
  )
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'fdiff_jax',
      'bench',
      '--config',
      'configs/test.py',
      '--what',
      'train',
      '--batch',
      '2',
      '--repeats',
      '1',
      '--out',
      str(out),
      '--config.model.ch=8',
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  machine = json.loads(out.read_text())['machine']
  assert (
    machine['glibc_tunables'] == 'glibc.malloc.trim_threshold=1000000000:glibc.malloc.hugetlb=1'
  )
  expected = cpu_runtime.with_default_xla_flags(
    '--xla_force_host_platform_device_count=1', cpu_runtime.jaxlib_version()
  )
  assert machine['xla_flags'] == expected


def test_opt_out_leaves_xla_flags_alone(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--a=1')
  monkeypatch.setenv('FDIFF_NO_CPU_TUNING', '1')
  cpu_runtime.set_xla_flags()
  assert os.environ['XLA_FLAGS'] == '--a=1'
  cpu_runtime.reexec_with_huge_pages()  # Returns: nothing to do.


def test_cpu_is_pinned_only_without_accelerators_or_a_choice(tmp_path, monkeypatch):
  nodes = (str(tmp_path / 'nvidia[0-9]*'), str(tmp_path / 'vfio' / '[0-9]*'))
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  cpu_runtime.pin_cpu_without_accelerators(nodes)
  assert os.environ['JAX_PLATFORMS'] == 'cpu'
  monkeypatch.delenv('JAX_PLATFORMS')
  (tmp_path / 'vfio').mkdir()
  (tmp_path / 'vfio' / '0').touch()  # A TPU v5e chip's node.
  cpu_runtime.pin_cpu_without_accelerators(nodes)
  assert 'JAX_PLATFORMS' not in os.environ  # JAX picks the accelerator itself.
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda')
  (tmp_path / 'vfio' / '0').unlink()
  cpu_runtime.pin_cpu_without_accelerators(nodes)
  assert os.environ['JAX_PLATFORMS'] == 'cuda'  # The user's choice stands.


def test_a_command_line_error_is_not_preceded_by_tensorflow_notices(tmp_path):
  proc = subprocess.run(
    [sys.executable, '-m', 'fdiff_jax', 'sample', '--workdir', str(tmp_path / 'none')],
    capture_output=True,
    text=True,
    env={k: v for k, v in os.environ.items() if not k.startswith('TF_')},
  )
  assert proc.returncode == 2
  assert 'oneDNN' not in proc.stderr, proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith('fdiff: error: '), proc.stderr
