"""`fdiff evaluate`'s report: report.json, the Markdown tables of report.md and report.png."""

import json
import os

from fdiff_jax.metrics import plot
from fdiff_jax.metrics.attribute_control import COMBINED_SIZES


def _number(value, digits=2):
  return 'n/a' if value is None else f'{value:.{digits}f}'


def markdown_table(report):
  """The report as a Markdown table, one row per (run, guidance)."""
  lines = [
    '| run | step | guidance | samples | FID | classifier FD | attr. acc. (real vectors) '
    '| attr. acc. (single prompts) | classifier ceiling | wall s |',
    '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for run in report['runs']:
    for row in run['results']:
      w = 'uncond.' if row['guidance'] is None else f'{row["guidance"]:g}'
      lines.append(
        f'| {run["name"]} | {run["step"]} | {w} | {row["num_samples"]} | {_number(row["fid"])} '
        f'| {_number(row["classifier_fd"], 3)} | {_number(row["attribute_accuracy"]["mean"], 3)} '
        f'| {_number(row["single_attribute_accuracy"]["mean"], 3)} '
        f'| {_number(run["classifier_ceiling"]["mean"], 3)} | {row["wall_time_s"]:.0f} |'
      )
  notes = [
    'FID and classifier FD: the samples column against the whole validation split, both '
    'uint8 round-tripped; FID is only comparable at equal sample counts.'
  ]
  if report['fid']['message']:
    notes.append(report['fid']['message'])
  return '\n'.join(lines + [''] + notes + [''] + _composition_table(report)) + '\n'


def _composition_table(report):
  """Joint accuracy, unspecified-attribute gap and interpolation rows, with their notes."""
  lines = [
    '| run | guidance | joint acc. 2 attr. (ceiling) | joint acc. 3 attr. (ceiling) '
    '| unspecified gap (floor; prompts) | interp. identity kept | interp. single flip |',
    '|---|---:|---:|---:|---:|---:|---:|',
  ]
  for run in report['runs']:
    for row in run['results']:
      joint, strips = row['joint_accuracy'], row['interpolation']
      unspecified = row['unspecified_attributes']
      if joint is None and strips is None:
        continue
      cells = [
        f'{_number(joint[k], 3)} ({_number(run["joint_ceiling"][k], 3)})' if joint else 'n/a'
        for k in map(str, COMBINED_SIZES)
      ]
      if unspecified:
        gap, floor = (_number(unspecified[k], 3) for k in ('mean_abs_gap', 'sampling_floor'))
        cells.append(f'{gap} ({floor}; {unspecified["num_prompts"]})')
      else:
        cells.append('n/a')
      cells += [_number(strips and strips[k], 3) for k in ('identity_kept', 'single_flip')]
      lines.append(f'| {run["name"]} | {row["guidance"]:g} | {" | ".join(cells)} |')
  if len(lines) == 2:
    return ['Joint, unspecified and interpolation metrics: not applicable to these runs.']
  support = report['settings']['min_train_support']
  return lines + [
    '',
    'Joint accuracy: samples with every specified attribute read back, for prompts of 2 or 3 '
    'attributes of real training images; ceiling: the same on the validation images '
    'matching each prompt.',
    'Unspecified gap: mean |rate in the samples - rate in the training images matching the '
    f'prompt| of each attribute a single or combined prompt leaves unspecified, over prompts '
    f'matched by at least {support} training images; floor: the gap expected of as many '
    'samples drawn from those training images (prompts: how many).',
    'Interpolation: each strip moves one attribute between two real attribute vectors (one '
    'without it, the nearest with it); identity kept: frames after the first whose held '
    'attributes (those both ends share) read as in the first; single flip: strips whose '
    'moved attribute reads absent, then present, changing once.',
  ]


def plot_report(report):
  """FID / classifier FD and attribute accuracy vs guidance, one line per run."""

  def series(metric, dashed_ceiling=False):
    out = []
    for run in report['runs']:
      xs = [r['guidance'] if r['guidance'] is not None else 1.0 for r in run['results']]
      out.append((run['name'], xs, [metric(r) for r in run['results']], not run['conditional']))
      if dashed_ceiling:
        out.append((f'{run["name"]} ceiling', xs[:1], [run['classifier_ceiling']['mean']], True))
    return out

  def composition():
    out = []
    for run in report['runs']:
      xs = [r['guidance'] for r in run['results']]
      for label, metric in (
        ('joint 2', lambda r: r['joint_accuracy'] and r['joint_accuracy']['2']),
        ('joint 3', lambda r: r['joint_accuracy'] and r['joint_accuracy']['3']),
        ('identity kept', lambda r: r['interpolation'] and r['interpolation']['identity_kept']),
      ):
        ys = [metric(r) for r in run['results']]
        if any(y is not None for y in ys):
          out.append((f'{run["name"]} {label}', xs, ys, False))
    return out

  panels = [
    plot.line_chart(
      'classifier Frechet distance', 'guidance', series(lambda r: r['classifier_fd'])
    ),
    plot.line_chart(
      'attribute accuracy (real vectors)',
      'guidance',
      series(lambda r: r['attribute_accuracy']['mean'], dashed_ceiling=True),
    ),
    plot.line_chart('joint accuracy, interpolation identity', 'guidance', composition()),
  ]
  if report['fid']['available']:
    panels.insert(0, plot.line_chart('FID', 'guidance', series(lambda r: r['fid'])))
  return plot.side_by_side(panels)


def write_report(report, out_dir):
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'report.json'), 'w') as f:
    json.dump(report, f, indent=2)
  with open(os.path.join(out_dir, 'report.md'), 'w') as f:
    f.write(markdown_table(report))
  plot_report(report).save(os.path.join(out_dir, 'report.png'))
