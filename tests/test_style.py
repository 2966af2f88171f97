"""One house style: `ruff check` and `ruff format --check` (configured in pyproject.toml) pass."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('command', [['check'], ['format', '--check']])
def test_ruff_is_clean(command):
  result = subprocess.run(
    [sys.executable, '-m', 'ruff', *command, '.'], cwd=ROOT, capture_output=True, text=True
  )
  assert result.returncode == 0, result.stdout + result.stderr
