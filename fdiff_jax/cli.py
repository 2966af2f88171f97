"""The `fdiff` command: parses flags and calls the library. Kept thin on purpose.

Every user mistake surfaces as one line on stderr and exit code 2.
"""
import argparse
import sys

from fdiff_jax.errors import UserError


def _config_overrides(unknown):
  """`--config.a.b=value` (or `--config.a.b value`) pairs from argparse's leftovers."""
  overrides, i = [], 0
  while i < len(unknown):
    arg = unknown[i]
    if not arg.startswith('--config.'):
      raise UserError(f'unrecognized argument {arg!r}; config fields are set with --config.a.b=value')
    arg = arg[len('--config.'):]
    if '=' not in arg:
      if i + 1 == len(unknown):
        raise UserError(f'--config.{arg} needs a value')
      arg, i = f'{arg}={unknown[i + 1]}', i + 1
    overrides.append(arg)
    i += 1
  return overrides


def cmd_train(args, unknown):
  from fdiff_jax import config_utils, train
  config = config_utils.load_config(args.config, _config_overrides(unknown))
  train.train_and_evaluate(config, args.workdir)


def cmd_synth_celeba(args, unknown):
  from fdiff_jax.data import synth_celeba
  synth_celeba.write_synthetic_celeba(args.dir, num=args.num, seed=args.seed, layout=args.layout)
  print(f'wrote {args.num} synthetic CelebA images to {args.dir}')


def build_parser():
  parser = argparse.ArgumentParser(prog='fdiff', description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest='command', required=True)

  p = commands.add_parser('train', help='train (or resume) a diffusion model in a workdir')
  p.add_argument('--config', required=True, help='config file, e.g. configs/digits.py')
  p.add_argument('--workdir', required=True)
  p.set_defaults(func=cmd_train, takes_overrides=True)

  data = commands.add_parser('data', help='dataset tools').add_subparsers(dest='data_command', required=True)
  p = data.add_parser('synth-celeba', help='write a synthetic CelebA in the official file layout')
  p.add_argument('dir')
  p.add_argument('--num', type=int, default=2000)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--layout', choices=('official', 'kaggle'), default='official')
  p.set_defaults(func=cmd_synth_celeba)
  return parser


def main(argv=None):
  parser = build_parser()
  args, unknown = parser.parse_known_args(argv)
  try:
    if unknown and not getattr(args, 'takes_overrides', False):
      raise UserError(f"unrecognized arguments: {' '.join(unknown)}")
    args.func(args, unknown)
  except UserError as e:
    print(f'fdiff: error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
