"""Small line charts drawn with PIL for evaluation reports (matplotlib is not a dependency)."""

import numpy as np
from PIL import Image, ImageDraw

COLORS = (
  (31, 119, 180),
  (214, 39, 40),
  (44, 160, 44),
  (148, 103, 189),
  (255, 127, 14),
  (140, 86, 75),
  (227, 119, 194),
  (127, 127, 127),
)


def _ticks(low, high, count=5):
  return [low + (high - low) * i / (count - 1) for i in range(count)]


def line_chart(title, x_label, series, size=(480, 360)):
  """One panel. `series`: [(label, xs, ys, dashed)]; a single-point series is drawn flat across."""
  width, height = size
  left, right, top, bottom = 60, 20, 30, 90
  image = Image.new('RGB', size, 'white')
  draw = ImageDraw.Draw(image)
  draw.text((left, 8), title, fill='black')
  points = [(x, y) for _, xs, ys, _ in series for x, y in zip(xs, ys) if y is not None]
  if not points:
    draw.text((left, height // 2), 'no data', fill='black')
    return image
  xs_all, ys_all = np.array(points, np.float64).T
  x0, x1 = xs_all.min(), max(xs_all.max(), xs_all.min() + 1)
  y0, y1 = ys_all.min(), ys_all.max()
  pad = (y1 - y0) * 0.1 or max(abs(y0) * 0.1, 1e-3)
  y0, y1 = y0 - pad, y1 + pad
  px = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)
  py = lambda y: height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)
  draw.rectangle((left, top, width - right, height - bottom), outline='black')
  for y in _ticks(y0, y1):
    draw.line((left - 4, py(y), left, py(y)), fill='black')
    draw.text((4, py(y) - 6), f'{y:.4g}', fill='black')
  for x in sorted(set(xs_all)):
    draw.line((px(x), height - bottom, px(x), height - bottom + 4), fill='black')
    draw.text((px(x) - 6, height - bottom + 6), f'{x:g}', fill='black')
  draw.text(((width - len(x_label) * 6) // 2, height - bottom + 20), x_label, fill='black')
  for i, (label, xs, ys, dashed) in enumerate(series):
    color = COLORS[i % len(COLORS)]
    line = [(px(x), py(y)) for x, y in zip(xs, ys) if y is not None]
    if len(line) == 1:  # A guidance-free run: a flat reference line.
      line = [(px(x0), line[0][1]), (px(x1), line[0][1])]
    for a, b in zip(line, line[1:]):
      _segment(draw, a, b, color, dashed)
    for x, y in line if len(xs) > 1 else ():
      draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
    ly = height - bottom + 36 + 14 * (i % 4)
    lx = left + (width - left - right) // 2 * (i // 4)
    _segment(draw, (lx, ly + 6), (lx + 20, ly + 6), color, dashed)
    draw.text((lx + 24, ly), label, fill='black')
  return image


def _segment(draw, a, b, color, dashed):
  if not dashed:
    draw.line((a, b), fill=color, width=2)
    return
  length = max(np.hypot(b[0] - a[0], b[1] - a[1]), 1e-9)
  for start in np.arange(0.0, length, 10.0):
    t0, t1 = start / length, min(start + 5.0, length) / length
    draw.line(
      (
        (a[0] + (b[0] - a[0]) * t0, a[1] + (b[1] - a[1]) * t0),
        (a[0] + (b[0] - a[0]) * t1, a[1] + (b[1] - a[1]) * t1),
      ),
      fill=color,
      width=2,
    )


def side_by_side(panels):
  """Concatenates PIL images horizontally."""
  out = Image.new('RGB', (sum(p.width for p in panels), max(p.height for p in panels)), 'white')
  x = 0
  for p in panels:
    out.paste(p, (x, 0))
    x += p.width
  return out
