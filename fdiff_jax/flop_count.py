"""FLOPs counted from an optimised HLO module's text, for `fdiff plan`.

XLA's GPU cost analysis returns nothing, and on GPU the GEMMs and
convolutions handed to cuBLAS / cuDNN are custom calls that no cost analysis
counts. `hlo_flops` reads the text `compiled.as_text()` gives and counts them
as the dots and convolutions they replaced, the rest as XLA's cost analysis
does.
"""

import math
import re

_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*')
_ARRAY = re.compile(r'(\w+)\[([\d,]*)\]')
# One FLOP per output element, as XLA's cost analysis counts elementwise arithmetic.
_ELEMENTWISE = {
  'add',
  'subtract',
  'multiply',
  'divide',
  'maximum',
  'minimum',
  'negate',
  'abs',
  'compare',
  'select',
  'clamp',
  'remainder',
  'and',
  'or',
  'xor',
  'not',
  'sign',
  'floor',
  'ceil',
  'round-nearest-even',
  'round-nearest-afz',
}
_CUDNN_CONV = ('__cudnn$conv',)
_CUBLAS = ('__cublas$gemm', '__cublas$lt$matmul')


def _balanced(text, start):
  """Index just past the bracket group opening at text[start]."""
  pairs = {'(': ')', '{': '}', '[': ']'}
  depth, closing = 0, []
  for i in range(start, len(text)):
    c = text[i]
    if c in pairs:
      closing.append(pairs[c])
      depth += 1
    elif closing and c == closing[-1]:
      closing.pop()
      depth -= 1
      if depth == 0:
        return i + 1
  return len(text)


def _top_level_split(text):
  """`text` split at the commas outside brackets, blanks dropped."""
  parts, depth, start = [], 0, 0
  for i, c in enumerate(text):
    depth += c in '([{'
    depth -= c in ')]}'
    if c == ',' and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  parts.append(text[start:])
  return [p.strip() for p in parts if p.strip()]


def _shapes(shape_text):
  """[(dtype, dims)] of an HLO shape, a tuple's elements in order."""
  return [
    (dtype, tuple(int(d) for d in dims.split(',') if d))
    for dtype, dims in _ARRAY.findall(shape_text)
  ]


def _parse_instruction(line):
  """(name, shapes, opcode, operand names, attribute text) of one HLO instruction, or None."""
  m = _INSTRUCTION.match(line)
  if not m:
    return None
  i = m.end()
  end = _balanced(line, i) if line[i] == '(' else line.index(' ', i)
  shapes = _shapes(line[i:end])
  rest = line[end:].lstrip()
  paren = rest.find('(')
  if paren < 0:
    return None
  opcode = rest[:paren].strip()
  close = _balanced(rest, paren)
  operands = [
    part.split()[-1].lstrip('%') for part in _top_level_split(rest[paren + 1 : close - 1])
  ]
  return m.group(1), shapes, opcode, operands, rest[close:]


def _window(attrs):
  """Per spatial dim: (size, stride, pad_lo, pad_hi, lhs_dilation, rhs_dilation)."""
  m = re.search(r'window=\{([^}]*)\}', attrs)
  fields = dict(kv.split('=', 1) for kv in m.group(1).split()) if m else {}
  sizes = [int(x) for x in fields.get('size', '').split('x') if x]
  per_dim = lambda key, default: (
    [int(x) for x in fields[key].split('x')] if key in fields else [default] * len(sizes)
  )
  pads = (
    [tuple(int(v) for v in p.split('_')) for p in fields['pad'].split('x')]
    if ('pad' in fields)
    else [(0, 0)] * len(sizes)
  )
  return list(
    zip(
      sizes,
      per_dim('stride', 1),
      [p[0] for p in pads],
      [p[1] for p in pads],
      per_dim('lhs_dilate', 1),
      per_dim('rhs_dilate', 1),
    )
  )


def _valid_taps(in_size, out_size, window):
  """(output position, kernel tap) pairs of one spatial dim that read a real input element."""
  size, stride, pad_lo, _, lhs_dilate, rhs_dilate = window
  last = (in_size - 1) * lhs_dilate
  count = 0
  for o in range(out_size):
    for k in range(size):
      pos = o * stride - pad_lo + k * rhs_dilate
      count += 0 <= pos <= last and pos % lhs_dilate == 0
  return count


def conv_flops(lhs, rhs, out, attrs):
  """2 x multiply-adds of a convolution, counting only taps that hit the input (as XLA does)."""
  m = re.search(r'dim_labels=(\w+)_(\w+)->(\w+)', attrs)
  lhs_l, rhs_l, out_l = m.groups()
  spatial = [c for c in out_l if c.isdigit()]
  taps = 1
  for d, window in zip(spatial, _window(attrs)):
    taps *= _valid_taps(lhs[lhs_l.index(d)], out[out_l.index(d)], window)
  out_elements = math.prod(out[i] for i, c in enumerate(out_l) if not c.isdigit())
  return 2 * out_elements * taps * rhs[rhs_l.index('i')]  # 'i': input features per group


def _dot_flops(lhs, out, contracting):
  return 2 * math.prod(out) * math.prod(lhs[d] for d in contracting)


def hlo_flops(hlo_text: str) -> dict:
  """FLOPs of an HLO module's text: {'total', 'matmul', 'custom_call_matmul'}.

  Dots and convolutions count 2 per multiply-add (convolutions only over taps
  inside the input, as XLA's cost analysis), elementwise arithmetic one per
  output element and reductions one per input element; GEMMs and convolutions
  in cuBLAS / cuDNN custom calls count like the dots and convolutions they
  replaced. Every computation counts once (loop bodies are not multiplied).
  """
  shapes, instructions = {}, []
  for line in hlo_text.splitlines():
    parsed = _parse_instruction(line)
    if parsed:
      shapes[parsed[0]] = parsed[1]
      instructions.append(parsed)
  dims = lambda name, index=0: shapes[name][index][1]
  matmul = custom = other = 0
  for _, out_shapes, opcode, operands, attrs in instructions:
    out = out_shapes[0][1] if out_shapes else ()
    if opcode == 'dot':
      contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', attrs).group(1)
      matmul += _dot_flops(dims(operands[0]), out, [int(d) for d in contracting.split(',') if d])
    elif opcode == 'convolution':
      matmul += conv_flops(dims(operands[0]), dims(operands[1]), out, attrs)
    elif opcode == 'custom-call':
      target = re.search(r'custom_call_target="([^"]+)"', attrs)
      target = target.group(1) if target else ''
      if target.startswith(_CUBLAS):
        m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', attrs)
        contracting = [int(d.strip('"')) for d in m.group(1).split(',') if d.strip()]
        custom += _dot_flops(dims(operands[0]), out, contracting)
      elif target.startswith(_CUDNN_CONV):
        custom += _cudnn_conv_flops(target, operands, out, attrs, dims)
    elif opcode in _ELEMENTWISE:
      other += math.prod(out)
    elif opcode == 'reduce' and operands:
      other += math.prod(dims(operands[0]))
  return {'total': matmul + custom + other, 'matmul': matmul, 'custom_call_matmul': custom}


def _cudnn_conv_flops(target, operands, out, attrs, dims):
  """A cuDNN convolution custom call's FLOPs, as the forward convolution it describes."""
  # window and dim_labels describe the forward convolution input (*) filter -> output.
  if 'BackwardInput' in target:
    lhs, rhs, result = out, dims(operands[1]), dims(operands[0])
  elif 'BackwardFilter' in target:
    lhs, rhs, result = dims(operands[0]), out, dims(operands[1])
  else:
    lhs, rhs, result = dims(operands[0]), dims(operands[1]), out
  return conv_flops(lhs, rhs, result, attrs)
