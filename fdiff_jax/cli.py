"""The `fdiff` command: parses flags and calls the library. Kept thin on purpose.

Every user mistake surfaces as one line on stderr and exit code 2.
"""

import argparse
import math
import os
import sys

from fdiff_jax import cpu_runtime
from fdiff_jax.errors import UserError


def _config_overrides(unknown):
  """`--config.a.b=value` (or `--config.a.b value`) pairs from argparse's leftovers."""
  overrides, i = [], 0
  while i < len(unknown):
    arg = unknown[i]
    if not arg.startswith('--config.'):
      raise UserError(
        f'unrecognized argument {arg!r}; config fields are set with --config.a.b=value'
      )
    arg = arg[len('--config.') :]
    if '=' not in arg:
      if i + 1 == len(unknown):
        raise UserError(f'--config.{arg} needs a value')
      arg, i = f'{arg}={unknown[i + 1]}', i + 1
    overrides.append(arg)
    i += 1
  return overrides


def _typed(parse, check, wanted):
  """An argparse type: `parse(text)`, refused (one line, exit 2) unless `check(value)`."""

  def convert(text):
    try:
      value = parse(text)
    except ValueError:
      value = None
    if value is None or not check(value):
      raise argparse.ArgumentTypeError(f'{text!r} is not {wanted}')
    return value

  convert.__name__ = wanted  # What argparse names in its own messages.
  return convert


# One type per kind of numeric flag, shared by every command that has such a flag.
positive_int = _typed(int, lambda v: v >= 1, 'a whole number >= 1')
nonnegative_int = _typed(int, lambda v: v >= 0, 'a whole number >= 0')
at_least_two = _typed(int, lambda v: v >= 2, 'a whole number >= 2')
guidance_weight = _typed(
  float, lambda v: math.isfinite(v) and v >= 0, 'a guidance weight (a finite number >= 0)'
)
nonnegative_float = _typed(float, lambda v: math.isfinite(v) and v >= 0, 'a finite number >= 0')
positive_float = _typed(float, lambda v: math.isfinite(v) and v > 0, 'a finite number > 0')
fraction = _typed(float, lambda v: 0 < v <= 1, 'a number in (0, 1]')
port_number = _typed(int, lambda v: 0 <= v <= 65535, 'a port number (0 to 65535)')


def _check_outputs(args):
  """Every output flag of `args` can be written: checked before any sampling or training."""
  from fdiff_jax import images

  taken = {}  # Absolute path -> the flag that names it.
  for flag, folder in (('out', False), ('gif', False), ('out_dir', True)):
    path, name = getattr(args, flag, None), '--' + flag.replace('_', '-')
    images.check_writable(path, name, folder)
    where = os.path.abspath(path) if path and '://' not in path else None
    if where in taken:
      raise UserError(f'{name} and {taken[where]} are both {path}; give two paths')
    if where:
      taken[where] = name


def cmd_train(args, overrides):
  from fdiff_jax import config_utils

  config = config_utils.load_config(args.config, overrides)  # Before TF's import noise.
  from fdiff_jax import parallel, train

  parallel.initialize_distributed(
    args.coordinator_address, args.num_processes, args.process_id, args.local_device_ids
  )
  train.train_diffusion(config, args.workdir)


def cmd_synth_celeba(args):
  from fdiff_jax.data import synth_celeba

  synth_celeba.write_synthetic_celeba(args.dir, num=args.num, seed=args.seed, layout=args.layout)
  print(f'wrote {args.num} synthetic CelebA images to {args.dir}')


def cmd_bench(args, overrides):
  from fdiff_jax import config_utils

  config = config_utils.load_config(args.config, overrides)
  from fdiff_jax import bench

  _check_outputs(args)
  what = bench.parse_workloads(args.what)
  result = bench.run(
    config,
    what=what,
    batch=args.batch,
    sampler=args.sampler,
    steps=args.steps,
    guidance=args.guidance,
    repeats=args.repeats,
    peak_tflops=args.peak_tflops,
    threads=bench.parse_threads(args.threads),
  )
  result['config'] = args.config
  print(bench.format_table(result))
  if args.out:
    bench.write_json(result, args.out)


def cmd_plan(args, overrides):
  from fdiff_jax import plan

  plan.prepare_process()  # Before the config's validation starts JAX.
  from fdiff_jax import config_utils

  config = config_utils.load_config(args.config, overrides)
  targets = [t for t in args.target.split(',') if t.strip()]
  for name in targets:
    plan.parse_target(name)  # Every name checked before the first (slow) compile.
  from fdiff_jax import images

  images.check_writable(args.json, '--json')
  results = []
  for name in targets:
    results.append(
      plan.plan(
        config,
        name,
        search_compiles=args.search_compiles,
        utilisation=args.utilisation,
        sampler=not args.no_sampler,
      )
    )
  print(plan.format_table(results))
  if args.json:
    plan.write_json(results, args.json)


def cmd_train_classifier(args, overrides):
  from fdiff_jax import config_utils

  config = config_utils.load_config(args.config, overrides)
  from fdiff_jax import classifier

  result = classifier.train_classifier(config, args.workdir)
  if result is not None:  # None: stopped by SIGTERM before the end.
    print(classifier.format_accuracy(result))


def cmd_evaluate(args):
  from fdiff_jax import evaluate, generate
  from fdiff_jax.metrics import report as report_lib

  _check_outputs(args)

  report = evaluate.evaluate(
    args.workdir,
    args.classifier,
    num_samples=args.num_samples,
    sampler=args.sampler,
    steps=args.steps,
    guidance=generate.parse_guidance(args.guidance),
    seed=args.seed,
    out_dir=args.out_dir,
    inception_weights=args.inception_weights,
    compute_fid=not args.no_fid,
    batch_size=args.batch_size,
    interp_strips=args.interp_strips,
    interp_frames=args.interp_frames,
  )
  print(report_lib.markdown_table(report), end='')
  print(f'wrote report.json, report.md and report.png to {report["out_dir"]}')


# Flags whose values may start with '-' ("-Smiling"); argparse would take those for options.
ATTRIBUTE_FLAGS = ('--attributes', '--from', '--to', '--set', '--source')


def _join_attribute_values(argv):
  """`--from -Smiling` -> `--from=-Smiling`, so negated attributes need no '=' from the user."""
  joined, i = [], 0
  while i < len(argv):
    if (
      argv[i] in ATTRIBUTE_FLAGS
      and i + 1 < len(argv)
      and argv[i + 1].startswith('-')
      and not argv[i + 1].startswith('--')
    ):
      joined.append(f'{argv[i]}={argv[i + 1]}')
      i += 2
    else:
      joined.append(argv[i])
      i += 1
  return joined


def _sampler(args):
  """The `Sampler` of the workdir's model, after checking that some output is asked for."""
  from fdiff_jax import checkpoints, sampler

  if not (args.out or args.out_dir or getattr(args, 'gif', None)):
    raise UserError('nothing would be written; give --out FILE.png and/or --out-dir DIR')
  _check_outputs(args)
  loaded = checkpoints.load_model(args.workdir, args.checkpoint_step)
  return sampler.Sampler(
    loaded.config,
    loaded.model,
    loaded.params,
    batch_size=args.batch_size,
    progress=sampler.print_progress,
  )


def _write(rows, prefix, out, out_dir, scale):
  """[rows, cols, H, W, C] images -> the `out` grid and/or out_dir/{prefix}_NNNN.png files."""
  from fdiff_jax import images

  if out:
    images.save_png(out, images.grid_image(rows), scale)
    print(f'wrote {out}')
  if out_dir:
    images.save_each(out_dir, rows.reshape((-1,) + rows.shape[2:]), prefix, scale)
    print(f'wrote {rows.shape[0] * rows.shape[1]} images to {out_dir}')


def _attribute_lines(args):
  """The attribute strings of --attributes, or the lines of --attributes-file (# comments skipped)."""
  if not args.attributes_file:
    return [args.attributes]
  if args.attributes:
    raise UserError('give --attributes or --attributes-file, not both')
  try:
    with open(args.attributes_file) as f:
      lines = [line.strip() for line in f]
  except OSError as e:
    raise UserError(f'cannot read --attributes-file: {e}') from None
  lines = [line for line in lines if line and not line.startswith('#')]
  if not lines:
    raise UserError(f'{args.attributes_file} has no attribute lines')
  return lines


def _int_list(text, flag):
  """`"0,1,2"` -> [0, 1, 2] for `flag`."""
  try:
    return [int(item) for item in text.split(',')]
  except ValueError:
    raise UserError(
      f'{flag} {text!r} is not a comma-separated list of integers, e.g. 0,1,2'
    ) from None


def cmd_sample(args):
  import numpy as np

  from fdiff_jax import generate

  guidances = generate.parse_guidance(args.guidance) if args.guidance else [None]
  sampler = _sampler(args)
  rows = np.stack(
    [generate.attribute_vector(sampler.config, text) for text in _attribute_lines(args)]
  )
  samples = generate.guidance_sweep(
    sampler,
    rows,
    guidances,
    num=args.num,
    seed=args.seed,
    solver=args.sampler,
    steps=args.steps,
    eta=args.eta,
  )
  _write(samples.reshape((-1,) + samples.shape[2:]), 'sample', args.out, args.out_dir, args.scale)


def cmd_interpolate(args):
  from fdiff_jax import generate, images

  sampler = _sampler(args)
  frames = generate.interpolate(
    sampler,
    generate.attribute_vector(sampler.config, args.start),
    generate.attribute_vector(sampler.config, args.end),
    frames=args.frames,
    seeds=_int_list(args.seeds, '--seeds'),
    guidance=args.guidance,
    solver=args.sampler,
    steps=args.steps,
  )
  _write(frames, 'frame', args.out, args.out_dir, args.scale)
  if args.gif:
    images.save_gif(args.gif, images.animation_frames(frames), scale=args.scale)
    print(f'wrote {args.gif}')


def cmd_edit(args):
  from fdiff_jax import generate

  sampler = _sampler(args)
  config = sampler.config
  image = generate.load_image(args.image, config)[None]
  classifier_dir = generate.classifier_dir(args.workdir, args.classifier)
  source_text = args.source
  if source_text is None:  # Read them with the classifier if there is one, else ask.
    if not generate.has_classifier(classifier_dir):
      raise UserError(
        "give the photo's attributes with --source \"Smiling,-Male,...\" ('' for "
        'none), or train a classifier with `fdiff train-classifier --workdir '
        f'{classifier_dir}` to read them (--source auto)'
      )
    source_text = 'auto'
  if source_text == 'auto':
    source = generate.predicted_attributes(config, image, classifier_dir)
  else:
    source = generate.attribute_vector(config, source_text)[None]
  panel = generate.edit_panel(
    sampler,
    image,
    source,
    generate.attribute_vector(config, args.set),
    method=args.method,
    strength=args.strength,
    guidance=args.guidance,
    steps=args.steps,
    seed=args.seed,
  )
  _write(panel, 'edit', args.out, None, args.scale)
  _write(panel[:, 2:], 'edit', None, args.out_dir, args.scale)


def cmd_export(args):
  from fdiff_jax import checkpoints, images

  images.check_writable(args.out, '--out', folder=True)

  loaded = checkpoints.export_model(args.workdir, args.out, args.checkpoint_step)
  print(f'wrote {args.out}: config and EMA parameters of step {loaded.step}')


def cmd_demo(args):
  if args.measure:
    from fdiff_jax.demo import browser

    browser.measure(args.workdir, screenshot=args.screenshot)
    return
  from fdiff_jax.demo import app

  app.serve(args.workdir, args.classifier, host=args.host, port=args.port, share=args.share)


def _add_generation_flags(p):
  """Flags shared by sample, interpolate and edit."""
  p.add_argument('--workdir', required=True, help='training workdir (config + checkpoints)')
  p.add_argument(
    '--checkpoint-step', type=nonnegative_int, help='checkpoint to use (default: latest)'
  )
  p.add_argument('--steps', type=positive_int, help='sampling steps (default: sample.steps)')
  p.add_argument(
    '--batch-size', type=positive_int, help='images per compiled batch (default: up to 32)'
  )
  p.add_argument('--out', help='grid PNG to write')
  p.add_argument('--out-dir', help='folder for the individual PNGs')
  p.add_argument('--scale', type=positive_int, default=1, help='enlarge the PNGs by this factor')


class _Parser(argparse.ArgumentParser):
  """argparse with one error line (no usage block), like every other user error."""

  def error(self, message):
    self.exit(2, f'{self.prog}: error: {message} (see {self.prog} --help)\n')


def build_parser():
  parser = _Parser(prog='fdiff', description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest='command', required=True)

  p = commands.add_parser('train', help='train (or resume) a diffusion model in a workdir')
  p.add_argument('--config', required=True, help='config file, e.g. configs/digits.py')
  p.add_argument('--workdir', required=True)
  multihost = p.add_argument_group(
    'multi-host',
    'one process per host (or GPU); auto-detected on SLURM and Cloud TPU VMs; '
    'each also read from FDIFF_<NAME> (e.g. FDIFF_PROCESS_ID); see launch/README.md',
  )
  multihost.add_argument('--coordinator_address', help='HOST:PORT of process 0, the same for all')
  multihost.add_argument(
    '--num_processes', type=positive_int, help='number of processes in the job'
  )
  multihost.add_argument(
    '--process_id', type=nonnegative_int, help='this process, 0 .. num_processes-1'
  )
  multihost.add_argument(
    '--local_device_ids', help="this process's devices, e.g. 0,1 (default: all)"
  )
  p.set_defaults(func=cmd_train, takes_overrides=True, exit_promptly=True)

  p = commands.add_parser(
    'bench', help='training/sampling/input-pipeline throughput and FLOP utilisation'
  )
  p.add_argument('--config', required=True, help='config file, e.g. configs/celeba64_original.py')
  p.add_argument('--batch', type=positive_int, help='batch size (default: train.batch_size)')
  p.add_argument(
    '--what',
    default='train,sample',
    help='comma-separated: train,sample,data (data: the input pipeline alone, images/s)',
  )
  p.add_argument(
    '--threads', default='1,2,4', help='input pipeline thread counts --what data measures'
  )
  p.add_argument('--sampler', help='ddpm | ddim | dpm++ (default: sample.sampler)')
  p.add_argument('--steps', type=positive_int, help='sampling steps (default: sample.steps)')
  p.add_argument('--guidance', type=guidance_weight, help='CFG weight w (default: sample.guidance)')
  p.add_argument('--repeats', type=positive_int, default=5, help='timed runs after one warm-up')
  p.add_argument('--peak-tflops', type=positive_float, help='peak to report utilisation against')
  p.add_argument('--out', help='write the results as JSON here')
  p.set_defaults(func=cmd_bench, takes_overrides=True)

  p = commands.add_parser(
    'plan', help='compile the train step for TPU slices / GPU hosts not here: memory, FLOPs, speed'
  )
  p.add_argument('--config', required=True, help='config file, e.g. configs/celeba64.py')
  p.add_argument(
    '--target', required=True, help='comma-separated, e.g. v5e-8,2xv5p-8,h100x8 (see docs)'
  )
  p.add_argument(
    '--search-compiles',
    type=nonnegative_int,
    default=3,
    help='extra compiles to find the largest batch that fits (0: no search)',
  )
  p.add_argument(
    '--utilisation', type=fraction, default=0.4, help='fraction of peak FLOP/s for the estimates'
  )
  p.add_argument('--no-sampler', action='store_true', help='skip the guided sampler call')
  p.add_argument('--json', help='write the results as JSON here')
  p.set_defaults(func=cmd_plan, takes_overrides=True)

  p = commands.add_parser('sample', help='sample images with chosen attributes; sweep guidance')
  _add_generation_flags(p)
  p.add_argument(
    '--attributes',
    default='',
    help='e.g. "Smiling,-Male,Eyeglasses=0.5"; '
    "unspecified attributes stay 0 ('' = unconditional)",
  )
  p.add_argument('--attributes-file', help='one attribute string per line: one grid row each')
  p.add_argument('--num', type=positive_int, default=8, help='images per attribute row')
  p.add_argument('--sampler', help='ddpm | ddim | dpm++ (default: sample.sampler)')
  p.add_argument(
    '--eta', type=nonnegative_float, help='DDIM noise, 0 = deterministic (default: sample.eta)'
  )
  p.add_argument('--guidance', help='CFG weight w, or a list "1,2,4": one row per w, same noise')
  p.add_argument(
    '--seed', type=nonnegative_int, default=0, help='image i starts from noise i of this seed'
  )
  p.set_defaults(func=cmd_sample)

  p = commands.add_parser('interpolate', help='move attributes smoothly with the identity held')
  _add_generation_flags(p)
  p.add_argument('--from', dest='start', default='', help='attributes of the first frame')
  p.add_argument('--to', dest='end', default='', help='attributes of the last frame')
  p.add_argument('--frames', type=at_least_two, default=8)
  p.add_argument('--seeds', default='0', help='one row per seed: image 0 of `fdiff sample --seed`')
  p.add_argument('--sampler', help='ddim | dpm++, deterministic (default: sample.sampler)')
  p.add_argument('--guidance', type=guidance_weight, help='CFG weight w (default: sample.guidance)')
  p.add_argument('--gif', help='also write an animation here')
  p.set_defaults(func=cmd_interpolate)

  p = commands.add_parser('edit', help='change attributes of a real photo')
  _add_generation_flags(p)
  p.add_argument('--image', required=True, help='photo to edit (JPEG, PNG, ...)')
  p.add_argument('--set', default='', help='attributes to change, e.g. "Eyeglasses,-Smiling"')
  p.add_argument(
    '--source',
    help="the photo's attributes ('' = all unspecified), or 'auto' to "
    'read them with the attribute classifier (default: auto if WORKDIR/classifier '
    'exists)',
  )
  p.add_argument(
    '--classifier', help='classifier workdir for --source auto (default: WORKDIR/classifier)'
  )
  p.add_argument('--method', default='inversion', help='inversion (DDIM) | sdedit')
  p.add_argument('--strength', type=fraction, default=0.5, help='sdedit: fraction of T to noise to')
  p.add_argument('--guidance', type=guidance_weight, help='CFG weight w (default: sample.guidance)')
  p.add_argument('--seed', type=nonnegative_int, default=0, help='sdedit noise')
  p.set_defaults(func=cmd_edit)

  p = commands.add_parser(
    'train-classifier', help='train the attribute classifier used by evaluate'
  )
  p.add_argument(
    '--config', required=True, help='config file of the dataset, e.g. configs/digits.py'
  )
  p.add_argument('--workdir', required=True, help='classifier workdir (config + checkpoints)')
  p.set_defaults(func=cmd_train_classifier, takes_overrides=True, exit_promptly=True)

  p = commands.add_parser('evaluate', help='FID, classifier FD and attribute accuracy vs guidance')
  p.add_argument(
    '--workdir',
    required=True,
    action='append',
    help='training workdir; repeat to compare runs side by side',
  )
  p.add_argument('--classifier', required=True, help='workdir of `fdiff train-classifier`')
  p.add_argument(
    '--num-samples', type=positive_int, default=1000, help='samples per run and guidance'
  )
  p.add_argument('--sampler', default='dpm++', help='ddpm | ddim | dpm++')
  p.add_argument('--steps', type=positive_int, help='sampling steps (default: sample.steps)')
  p.add_argument('--guidance', default='0,1,2,4', help='CFG weights to sweep, e.g. 0,1,2,4')
  p.add_argument('--seed', type=nonnegative_int, default=0, help='noise and conditioning vectors')
  p.add_argument('--out-dir', help='where the report goes (default: FIRST_WORKDIR/eval)')
  p.add_argument(
    '--inception-weights',
    help='pytorch-fid pt_inception-2015-12-05-6726825d.pth or '
    '.npz (default: the cache, downloaded once when online)',
  )
  p.add_argument('--no-fid', action='store_true', help='skip FID (no Inception weights needed)')
  p.add_argument('--batch-size', type=positive_int, default=256, help='images per compiled batch')
  p.add_argument(
    '--interp-strips',
    type=nonnegative_int,
    default=8,
    help='interpolation strips per run and guidance, one attribute each (0 skips them)',
  )
  p.add_argument(
    '--interp-frames', type=at_least_two, default=8, help='frames per interpolation strip'
  )
  p.set_defaults(func=cmd_evaluate)

  p = commands.add_parser('export', help='write a workdir with the config and EMA parameters only')
  p.add_argument('--workdir', required=True, help='training workdir (config + checkpoints)')
  p.add_argument('--out', required=True, help='new folder; use it as --workdir of any sampler')
  p.add_argument(
    '--checkpoint-step', type=nonnegative_int, help='checkpoint to export (default: latest)'
  )
  p.set_defaults(func=cmd_export)

  p = commands.add_parser('demo', help='an interactive page: sample, interpolate, edit (gradio)')
  p.add_argument(
    '--workdir', help='trained or exported model (default: pretrained/synth-faces of the repo)'
  )
  p.add_argument('--classifier', help='classifier workdir that reads the attributes of photos')
  p.add_argument('--port', type=port_number, default=7860)
  p.add_argument('--host', default='127.0.0.1', help='0.0.0.0 serves other machines too')
  p.add_argument('--share', action='store_true', help='also serve through a public gradio link')
  p.add_argument(
    '--measure',
    action='store_true',
    help='instead of serving: time start-up (cold and warm compilation cache) and '
    'click-to-image in headless Chromium',
  )
  p.add_argument('--screenshot', help='with --measure: save a screenshot of the page here')
  p.set_defaults(func=cmd_demo)

  data = commands.add_parser('data', help='dataset tools').add_subparsers(
    dest='data_command', required=True
  )
  p = data.add_parser('synth-celeba', help='write a synthetic CelebA in the official file layout')
  p.add_argument('dir')
  p.add_argument('--num', type=positive_int, default=2000)
  p.add_argument('--seed', type=nonnegative_int, default=0)
  p.add_argument('--layout', choices=('official', 'kaggle'), default='official')
  p.set_defaults(func=cmd_synth_celeba)
  return parser


def main(argv=None):
  if argv is None:  # The command line, not a call from Python.
    cpu_runtime.pin_cpu_without_accelerators()
    cpu_runtime.quiet_tensorflow()
    cpu_runtime.reexec_with_huge_pages()
  cpu_runtime.set_xla_flags()
  parser = build_parser()
  try:
    args, unknown = parser.parse_known_args(
      _join_attribute_values(sys.argv[1:] if argv is None else argv)
    )
  except SystemExit as e:  # --help, or a flag error already printed as one line.
    return e.code
  code = 0
  try:
    if getattr(args, 'takes_overrides', False):
      args.func(args, _config_overrides(unknown))
    elif unknown:
      raise UserError(f'unrecognized arguments: {" ".join(unknown)}')
    else:
      args.func(args)
  except UserError as e:
    print(f'fdiff: error: {e}', file=sys.stderr)
    code = 2
  if argv is None and getattr(args, 'exit_promptly', False):
    _exit_now(code)
  return code


def _exit_now(code):
  """Ends a training command at once: its checkpoints are committed and its logs written.

  Interpreter teardown after training (TF/XLA threads and objects) takes many
  seconds; a preempted job has little grace time, so skip it.
  """
  import faulthandler
  import logging

  if 'jax' in sys.modules:
    import jax

    if jax.process_count() > 1:
      # Every process must reach the shutdown barrier: say so in its log, and
      # dump the Python stacks if leaving takes long, so a late process shows where.
      print(f'process {jax.process_index()}: done, leaving the job', file=sys.stderr, flush=True)
      faulthandler.dump_traceback_later(60, exit=False)
      jax.distributed.shutdown()
  logging.shutdown()  # Flushes absl's handlers.
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


if __name__ == '__main__':
  sys.exit(main())
