"""Attribute vocabularies and the `"Smiling,-Male,Eyeglasses=0.5"` syntax.

An attribute vector holds +1 (present), -1 (absent) or 0 (unspecified) per
name; values in between interpolate. All zeros is the unconditional input.
"""

import difflib
from collections.abc import Sequence

import numpy as np

from fdiff_jax.errors import UserError

# The 40 CelebA attributes, in the column order of `list_attr_celeba.txt`.
CELEBA_ATTRIBUTES = (
  '5_o_Clock_Shadow',
  'Arched_Eyebrows',
  'Attractive',
  'Bags_Under_Eyes',
  'Bald',
  'Bangs',
  'Big_Lips',
  'Big_Nose',
  'Black_Hair',
  'Blond_Hair',
  'Blurry',
  'Brown_Hair',
  'Bushy_Eyebrows',
  'Chubby',
  'Double_Chin',
  'Eyeglasses',
  'Goatee',
  'Gray_Hair',
  'Heavy_Makeup',
  'High_Cheekbones',
  'Male',
  'Mouth_Slightly_Open',
  'Mustache',
  'Narrow_Eyes',
  'No_Beard',
  'Oval_Face',
  'Pale_Skin',
  'Pointy_Nose',
  'Receding_Hairline',
  'Rosy_Cheeks',
  'Sideburns',
  'Smiling',
  'Straight_Hair',
  'Wavy_Hair',
  'Wearing_Earrings',
  'Wearing_Hat',
  'Wearing_Lipstick',
  'Wearing_Necklace',
  'Wearing_Necktie',
  'Young',
)

# One attribute per class for digits and MNIST.
DIGIT_ATTRIBUTES = tuple(str(d) for d in range(10))


def parse_attributes(text: str, names: Sequence[str]) -> np.ndarray:
  """Parses `"Smiling,-Male,Eyeglasses=0.5"` into a float32 vector over `names`.

  `Name` means +1, `-Name` means -1, `Name=v` sets v in [-1, 1]; names not
  mentioned stay 0 (unspecified). Matching is case-insensitive.
  """
  index = {name.lower(): i for i, name in enumerate(names)}
  vector = np.zeros(len(names), np.float32)
  seen = set()
  for item in text.split(','):
    item = item.strip()
    if not item:
      continue
    name, value = _parse_item(item)
    key = name.lower()
    if key not in index:
      raise UserError(_unknown_name_message(name, names))
    if key in seen:
      raise UserError(f"attribute '{name}' is given twice in '{text}'; give each attribute once.")
    seen.add(key)
    vector[index[key]] = value
  return vector


def _parse_item(item: str) -> tuple[str, float]:
  """Splits one `Name`, `-Name` or `Name=value` item into (name, value)."""
  if '=' in item:
    name, raw = (part.strip() for part in item.split('=', 1))
    try:
      value = float(raw)
    except ValueError:
      raise UserError(
        f"attribute value '{raw}' in '{item}' is not a number; write e.g."
        f" '{name}=0.5' (a value in [-1, 1])."
      ) from None
    if not -1.0 <= value <= 1.0:
      raise UserError(
        f"attribute value {raw} in '{item}' is outside [-1, 1]; use -1 (absent) .. 1 (present)."
      )
    return name, value
  if item.startswith('-'):
    return item[1:].strip(), -1.0
  return item.lstrip('+').strip(), 1.0


def _unknown_name_message(name: str, names: Sequence[str]) -> str:
  """One line naming the closest valid attribute names."""
  lower = {n.lower(): n for n in names}
  close = difflib.get_close_matches(name.lower(), list(lower), n=3, cutoff=0.4)
  if close:
    hint = 'did you mean ' + ', '.join(lower[c] for c in close) + '?'
  else:
    hint = 'valid names: ' + ', '.join(names) + '.'
  return f"unknown attribute '{name}'; {hint}"
