"""Process settings that make XLA:CPU faster; `fdiff` applies them before JAX starts.

- XLA's YNNPACK library fusions, which jaxlib 0.10 uses for convolutions too,
  run this U-Net's convolutions slower than XLA's own but its reductions
  (softmax, GroupNorm) faster, so they are kept for reductions and single
  matmuls only. The flag exists only in recent jaxlib and XLA aborts on
  unknown flags, so it is added only for the jaxlib versions it was measured on.
- XLA allocates its temporary buffer afresh for every call, and the kernel
  faults it in 4 KiB at a time. glibc's `hugetlb` tunable backs large
  allocations with transparent huge pages. glibc reads tunables only at
  start-up, so the `fdiff` command re-executes itself once with GLIBC_TUNABLES set.

- On a machine with no accelerator, JAX would still start every installed
  accelerator plugin (libtpu and the CUDA plugin of the `plan` extra), which
  print errors and a traceback before falling back to the CPU. With no
  accelerator device node in /dev and JAX_PLATFORMS unset, `fdiff` sets
  JAX_PLATFORMS=cpu: the CPU is what JAX would pick there anyway.
- TensorFlow only reads and decodes data here; `fdiff` turns off its oneDNN
  kernels, whose start-up notice would otherwise come before every command's
  output, error lines included.

What each setting gained, measured with `fdiff bench`: docs/performance.md.
Flags and tunables the user has already set are left alone, and
FDIFF_NO_CPU_TUNING=1 leaves XLA and glibc at their own defaults (to compare).
"""

import glob
import importlib.metadata
import os
import sys

# jaxlib (major, minor) -> XLA:CPU flags measured to help there.
XLA_CPU_FLAGS = {
  (0, 10): (
    '--xla_cpu_experimental_ynn_fusion_type='
    'LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT',
  )
}
HUGE_PAGES = 'glibc.malloc.hugetlb=1'


def _opted_out():
  return os.environ.get('FDIFF_NO_CPU_TUNING', '') not in ('', '0')


def jaxlib_version():
  """(major, minor) of the installed jaxlib, or None."""
  try:
    return tuple(int(x) for x in importlib.metadata.version('jaxlib').split('.')[:2])
  except (importlib.metadata.PackageNotFoundError, ValueError):
    return None


def with_default_xla_flags(xla_flags, version):
  """`xla_flags` plus our defaults for jaxlib `version`, except flags it already sets."""
  flags = xla_flags.split()
  have = {f.split('=')[0] for f in flags}
  flags += [f for f in XLA_CPU_FLAGS.get(version, ()) if f.split('=')[0] not in have]
  return ' '.join(flags)


def with_huge_pages(glibc_tunables):
  """GLIBC_TUNABLES with the huge-pages tunable added, unless it sets hugetlb itself."""
  if 'glibc.malloc.hugetlb' in glibc_tunables:
    return glibc_tunables
  return ':'.join(filter(None, [glibc_tunables, HUGE_PAGES]))


def set_xla_flags():
  """Adds our XLA:CPU defaults to XLA_FLAGS; effective only before JAX's backends start."""
  if _opted_out():
    return
  os.environ['XLA_FLAGS'] = with_default_xla_flags(
    os.environ.get('XLA_FLAGS', ''), jaxlib_version()
  )


# Device nodes of accelerators JAX can use: NVIDIA GPUs, AMD GPUs, TPUs (v4: accel, v5e on: vfio).
ACCELERATOR_NODES = ('/dev/nvidia[0-9]*', '/dev/kfd', '/dev/accel[0-9]*', '/dev/vfio/[0-9]*')


def has_accelerator(dev_patterns=ACCELERATOR_NODES):
  """Whether any accelerator device node is present (a cheap look in /dev, no JAX)."""
  return any(glob.glob(pattern) for pattern in dev_patterns)


def pin_cpu_without_accelerators(dev_patterns=ACCELERATOR_NODES):
  """JAX_PLATFORMS=cpu where there is no accelerator and the user chose no platform."""
  if 'JAX_PLATFORMS' not in os.environ and not has_accelerator(dev_patterns):
    os.environ['JAX_PLATFORMS'] = 'cpu'


def quiet_tensorflow():
  """No oneDNN kernels (nor their start-up notice) in TensorFlow, unless the user chose."""
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')


def _glibc():
  try:
    return os.confstr('CS_GNU_LIBC_VERSION').startswith('glibc')
  except (AttributeError, ValueError, OSError):
    return False


def reexec_with_huge_pages():
  """Re-runs this command as `python -m fdiff_jax ...` with the tunable set (glibc only).

  Returns only when nothing needs doing (or exec failed); otherwise the process
  is replaced.
  """
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  if _opted_out() or not _glibc() or with_huge_pages(tunables) == tunables:
    return
  env = dict(os.environ, GLIBC_TUNABLES=with_huge_pages(tunables))
  try:
    os.execve(sys.executable, [sys.executable, '-m', 'fdiff_jax', *sys.argv[1:]], env)
  except OSError:
    pass
