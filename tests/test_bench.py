"""`fdiff bench` on the tiny test config: the JSON report's fields and sanity, and bad flags."""

import json
import math

import pytest

from fdiff_jax import bench, cli

CONFIG = 'configs/test.py'
WORKLOAD_FIELDS = (
  'batch',
  'compile_seconds',
  'seconds_median',
  'seconds_min',
  'seconds_max',
  'images_per_sec',
  'images_per_sec_min',
  'images_per_sec_max',
  'flops_per_call',
  'achieved_tflops',
  'utilisation_vs_peak',
  'matmul_ceiling_tflops',
  'utilisation_vs_matmul',
  'peak_memory_bytes',
)


@pytest.fixture(scope='module')
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp('bench') / 'bench.json'
  assert (
    cli.main(
      [
        'bench',
        '--config',
        CONFIG,
        '--batch',
        '2',
        '--steps',
        '2',
        '--repeats',
        '2',
        '--peak-tflops',
        '1',
        '--out',
        str(out),
        '--config.model.ch=8',
      ]
    )
    == 0
  )
  return json.loads(out.read_text())


def test_report_describes_machine_and_model(report):
  assert report['machine']['platform'] == 'cpu'
  assert report['machine']['cpu_count'] >= 1 and len(report['machine']['load_average']) == 3
  assert report['peak_tflops'] == 1.0
  assert report['model']['image_shape'] == [16, 16, 3] and report['model']['params'] > 0


@pytest.mark.parametrize('workload', bench.WORKLOADS)
def test_every_field_is_finite_and_positive(report, workload):
  r = report[workload]
  for field in WORKLOAD_FIELDS:
    assert isinstance(r[field], (int, float)) and math.isfinite(r[field]) and r[field] > 0, field
  assert r['seconds_min'] <= r['seconds_median'] <= r['seconds_max']
  assert r['peak_memory_source'] in ('device', 'host_rss', 'host_rss_process')


@pytest.mark.parametrize('workload', bench.WORKLOADS)
def test_utilisation_is_in_a_sane_range(report, workload):
  r = report[workload]
  assert 0 < r['utilisation_vs_matmul'] <= 1.5
  assert 0 < r['utilisation_vs_peak'] <= 1.5
  assert math.isclose(r['achieved_tflops'] * 1e12, r['flops_per_call'] / r['seconds_median'])


def test_sampler_settings_are_recorded(report):
  s = report['sample']
  assert (s['sampler'], s['steps'], s['guidance']) == ('dpm++', 2, 2.0)


def test_bad_what_is_one_clear_error(capsys):
  assert cli.main(['bench', '--config', CONFIG, '--what', 'train,evaluate']) == 2
  err = capsys.readouterr().err.strip()
  assert (
    len(err.splitlines()) == 1 and "workloads 'train,evaluate'" in err and 'train,sample' in err
  )


def test_published_peaks_match_device_kinds():
  assert bench.published_peak_tflops('NVIDIA H100 80GB HBM3') == 989.0
  assert bench.published_peak_tflops('TPU v5 lite') == 197.0
  assert bench.published_peak_tflops('TPU v5p') == 459.0
  assert bench.published_peak_tflops('cpu') is None


def test_sampling_flops_count_every_step_and_both_guidance_branches():
  from fdiff_jax import config_utils  # pylint: disable=import-outside-toplevel
  from fdiff_jax.models import build_model  # pylint: disable=import-outside-toplevel

  config = config_utils.load_config(CONFIG, ['model.ch=8'])
  model = build_model(config.model, 40)
  mesh = bench.parallel.create_mesh()
  flops = {
    (steps, w): bench.bench_sample(
      config, model, mesh, 2, 1, sampler='ddim', steps=steps, guidance=w
    )[1]
    for steps, w in ((2, 1.0), (2, 3.0), (4, 3.0))
  }
  assert math.isclose(flops[4, 3.0], 2 * flops[2, 3.0])
  assert 1.9 < flops[2, 3.0] / flops[2, 1.0] < 2.1  # w != 1 evaluates cond and uncond.


def test_host_peak_is_per_workload_after_a_reset():
  import numpy as np  # pylint: disable=import-outside-toplevel

  big = np.ones(300 * 2**20 // 8)  # 300 MiB touched, then freed.
  before = bench.peak_memory(False)[0]
  del big
  if not bench.reset_host_peak():
    pytest.skip('no /proc/self/clear_refs on this system')
  after, source = bench.peak_memory(True)
  assert source == 'host_rss' and after < before - 200 * 2**20


def test_data_reports_images_per_second_per_thread_count(tmp_path, capsys):
  import faces  # pylint: disable=import-outside-toplevel

  manual_dir, data_dir = faces.synthetic_celeba(tmp_path, num=20)
  out = tmp_path / 'data.json'
  args = ['bench', '--config', CONFIG, '--what', 'data', '--batch', '4', '--repeats', '2']
  args += ['--threads', '1,3', '--out', str(out)]
  args += [f'--config.data.manual_dir={manual_dir}', f'--config.data.data_dir={data_dir}']
  assert cli.main(args) == 0
  d = json.loads(out.read_text())['data']
  assert 'train' not in json.loads(out.read_text())  # Only what was asked for.
  assert (d['dataset'], d['examples'], d['batch'], d['image_shape']) == (
    'celeba',
    16,
    4,
    [16, 16, 3],
  )
  assert [r['threads'] for r in d['runs']] == [1, 3]
  for r in d['runs']:
    assert all(math.isfinite(r[k]) and r[k] > 0 for k in ('images_per_sec', 'images_per_sec_min'))
    assert r['images_per_sec_min'] <= r['images_per_sec'] <= r['images_per_sec_max']
  assert d['prepare_seconds'] > 0 and d['tfds_prepare_seconds'] > 0
  assert 'threads' in capsys.readouterr().out


def test_bad_threads_is_one_clear_error(capsys):
  assert cli.main(['bench', '--config', CONFIG, '--what', 'data', '--threads', '0,2']) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "threads '0,2'" in err
