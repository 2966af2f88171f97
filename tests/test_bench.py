"""`fdiff bench` on the tiny test config: the JSON report's fields and sanity, and bad flags."""
import json
import math

import pytest

from fdiff_jax import bench, cli

CONFIG = 'configs/test.py'
WORKLOAD_FIELDS = (
    'batch', 'compile_seconds', 'seconds_median', 'seconds_min', 'seconds_max',
    'images_per_sec', 'images_per_sec_min', 'images_per_sec_max', 'flops_per_call',
    'achieved_tflops', 'utilisation_vs_peak', 'matmul_ceiling_tflops',
    'utilisation_vs_matmul', 'peak_memory_bytes')


@pytest.fixture(scope='module')
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp('bench') / 'bench.json'
  assert cli.main(['bench', '--config', CONFIG, '--batch', '2', '--steps', '2', '--repeats', '2',
                   '--peak-tflops', '1', '--out', str(out), '--config.model.ch=8']) == 0
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
  assert r['peak_memory_source'] in ('device', 'host_rss')


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
  assert len(err.splitlines()) == 1 and "--what 'train,evaluate'" in err and 'train,sample' in err


def test_published_peaks_match_device_kinds():
  assert bench.published_peak_tflops('NVIDIA H100 80GB HBM3') == 989.0
  assert bench.published_peak_tflops('TPU v5 lite') == 197.0
  assert bench.published_peak_tflops('TPU v5p') == 459.0
  assert bench.published_peak_tflops('cpu') is None
