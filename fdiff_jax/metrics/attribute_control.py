"""Attribute-control metrics and prompts: pure functions of numpy arrays.

Attribute vectors [N, A] hold +1 (present), -1 (absent) or 0 (unspecified);
classifier readings are +-1. `fdiff evaluate` samples from the prompts built
here, reads the samples back with the attribute classifier and scores them:
  * informative attributes: those scored at all, present in some and absent in
    other validation images (present in some, for one-hot datasets);
  * conditioning / combined_prompts: realistic vectors of real images,
    single-attribute prompts, and prompts of 2 or 3 attributes taken from one
    real training vector, so each combination occurs in the data;
  * joint accuracy: the fraction of samples with every specified attribute
    read back; its ceiling is the classifier's joint accuracy on the real
    images matching each prompt;
  * unspecified rates: per prompt, the rate of each attribute it leaves
    unspecified in the samples against its rate in the training images that
    match the prompt (P(Male | Mustache)), and the mean absolute gap; prompts
    matched by too few training images are skipped. Its sampling floor is the
    gap that as many samples drawn from those training images would show on
    average, so a small sample count is not mistaken for a model error;
  * interpolation: each strip moves one attribute between two real vectors, a
    random one without it and the nearest one with it, so the attributes the
    data ties to it move too (one hair colour replaces another) and the rest
    are held. Identity kept: the fraction of frames whose held attributes read
    as in the first frame; single flip: the fraction of strips whose moved
    attribute reads absent, then present, changing once.
"""

import math

import numpy as np

from fdiff_jax.data import attributes as attributes_lib

COMBINED_SIZES = (2, 3)  # Attributes per combined prompt.


def informative_attributes(targets, one_hot):
  """Attributes scored for control: present in some and absent in other validation images."""
  if one_hot:
    return (targets > 0).any(0)
  return (targets > 0).any(0) & (targets < 0).any(0)


def conditioning(targets, names, informative, one_hot, num_samples, seed):
  """(realistic vectors [N, A] of random validation images, single-attribute prompt vectors).

  Every prompt gets ceil(N / prompts) samples, so each attribute is scored.
  """
  rng = np.random.default_rng(seed)
  realistic = targets[rng.choice(len(targets), num_samples, replace=len(targets) < num_samples)]
  prompts = [
    p
    for i, name in enumerate(names)
    if informative[i]
    for p in ((name,) if one_hot else (name, f'-{name}'))
  ]
  single = np.stack([attributes_lib.parse_attributes(p, names) for p in prompts])
  return realistic.astype(np.float32), repeat_prompts(single, num_samples)


def repeat_prompts(prompts, num_samples):
  """Each prompt ceil(N / prompts) times, in order."""
  return np.repeat(prompts, -(-num_samples // len(prompts)), axis=0)


def combined_prompts(labels, informative, size, num_prompts, seed):
  """[num_prompts, A]: `size` informative attributes of random rows of `labels`, the rest 0.

  Each prompt keeps the values of one real vector, so the combination occurs in `labels`.
  A vector's present and absent attributes are equally likely to be picked (CelebA's
  vectors are mostly absences). None if fewer than `size` attributes are informative.
  """
  candidates = np.flatnonzero(informative)
  if len(candidates) < size:
    return None
  rng = np.random.default_rng([seed, size])
  rows = rng.choice(len(labels), num_prompts, replace=len(labels) < num_prompts)
  prompts = np.zeros((num_prompts, labels.shape[1]), np.float32)
  for prompt, values in zip(prompts, labels[rows][:, candidates]):
    present, absent = values > 0, values < 0
    weights = present / max(present.sum(), 1) + absent / max(absent.sum(), 1)
    picked = rng.choice(len(candidates), size, replace=False, p=weights / weights.sum())
    prompt[candidates[picked]] = values[picked]
  return prompts


def strip_attributes(informative, num_strips, seed):
  """Attribute index interpolated by each strip: informative attributes in a seeded order."""
  order = np.random.default_rng(seed).permutation(np.flatnonzero(informative))
  return order[np.arange(num_strips) % len(order)] if len(order) else order[:0]


def strip_endpoints(labels, informative, moved, seed):
  """(start, end) [S, A] of strips moving attribute `moved[s]` from absent to present.

  Both ends are rows of `labels` on the informative attributes (0 elsewhere): a
  random row without the attribute, and of the rows with it, one that changes
  the fewest other informative attributes. Where no row lacks or has it, the
  strip moves it alone with everything else unspecified (nothing held).
  """
  columns = np.flatnonzero(informative)
  rng = np.random.default_rng([seed, len(moved)])
  starts = np.zeros((len(moved), labels.shape[1]), np.float32)
  ends = np.zeros_like(starts)
  for s, attribute in enumerate(moved):
    values = labels[:, columns]
    without = values[labels[:, attribute] < 0]
    present = values[labels[:, attribute] > 0]
    if not len(without) or not len(present):
      starts[s, attribute], ends[s, attribute] = -1, 1
      continue
    start = without[rng.integers(len(without))]
    changed = (present != start).sum(1)
    nearest = present[changed == changed.min()]
    starts[s, columns], ends[s, columns] = start, nearest[rng.integers(len(nearest))]
  return starts, ends


def held_attributes(starts, ends):
  """[S, A] bool: the attributes a strip specifies and keeps from start to end."""
  return (starts == ends) & (starts != 0)


def matching(labels, prompt):
  """[N] bool: rows of `labels` [N, A] with every specified attribute of `prompt` [A]."""
  return ((labels == np.sign(prompt)) | (prompt == 0)).all(1)


def joint_accuracy(predicted, vectors, informative):
  """Fraction of rows whose every specified informative attribute is read back.

  `predicted` and `vectors` are [N, A]; rows that specify no informative attribute do not count.
  None if no row counts.
  """
  specified = (vectors != 0) & informative[None]
  satisfied = ((predicted == np.sign(vectors)) | ~specified).all(1)
  counted = specified.any(1)
  return float(satisfied[counted].mean()) if counted.any() else None


def joint_ceiling(predicted, targets, prompts, informative):
  """Mean over `prompts` of the classifier's joint accuracy on the real images matching each.

  `predicted` and `targets` [N, A] are the classifier's readings and the labels of real
  images; prompts that no image matches do not count.
  """
  values = [
    joint_accuracy(predicted[m], np.broadcast_to(p, (m.sum(), len(p))), informative)
    for p in prompts
    if (m := matching(targets, p)).any()
  ]
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def sampling_gap(n, p):
  """E|k / n - p| for k ~ Binomial(n, p): the mean gap of n samples drawn at rate p."""
  if p <= 0 or p >= 1:
    return 0.0
  k = np.arange(n + 1)
  log_comb = np.array([math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) for j in k])
  pmf = np.exp(log_comb + k * math.log(p) + (n - k) * math.log1p(-p))
  return float((pmf * np.abs(k / n - p)).sum())


def unspecified_rates(predicted, vectors, labels, informative, names, min_support):
  """Rates of unspecified attributes in samples vs in the training images matching the prompt.

  `predicted` [N, A] are the classifier's readings of samples of `vectors` [N, A];
  each distinct row of `vectors` is a prompt. For every prompt matched by at
  least `min_support` rows of the training `labels` [M, A], and every
  informative attribute it leaves unspecified, the fraction of its samples read
  as present ('sampled') and of the matching training images labelled present
  ('train'). Prompts with fewer matches are skipped rather than reported as noise.
  'sampling_floor' is the mean gap expected of samples drawn at the training rates.
  """
  prompts, which = np.unique(vectors, axis=0, return_inverse=True)
  which = which.reshape(-1)
  report, gaps, floors, skipped = {}, [], [], 0
  for i, prompt in enumerate(prompts):
    free = informative & (prompt == 0)
    if not free.any():
      continue
    match = matching(labels, prompt)
    if match.sum() < min_support:
      skipped += 1
      continue
    sampled = (predicted[which == i][:, free] > 0).mean(0)
    train = (labels[match][:, free] > 0).mean(0)
    n = int((which == i).sum())
    gaps.extend(np.abs(sampled - train))
    floors.extend(sampling_gap(n, t) for t in train)
    report[_prompt_text(prompt, names)] = {
      'samples': n,
      'train_support': int(match.sum()),
      'mean_abs_gap': float(np.abs(sampled - train).mean()),
      'rates': {
        name: {'sampled': float(s), 'train': float(t)}
        for name, s, t in zip(np.asarray(names)[free], sampled, train)
      },
    }
  return {
    'mean_abs_gap': float(np.mean(gaps)) if gaps else None,
    'sampling_floor': float(np.mean(floors)) if floors else None,
    'min_train_support': min_support,
    'num_prompts': len(report),
    'skipped_prompts': skipped,
    'prompts': report,
  }


def identity_kept(readings, held):
  """Fraction of frames after the first whose held attributes read as in the first.

  `readings` [S, F, A] are the classifier's +-1 readings of S strips of F
  frames; `held` [S, A] marks the attributes each strip holds (`held_attributes`).
  """
  kept = (readings[:, 1:] == readings[:, :1]) | ~held[:, None]
  return float(kept.all(-1).mean())


def held_changes(readings, held):
  """[A]: per attribute, the fraction of later frames that read it unlike the first, over
  the strips that hold it (NaN where no strip holds it). Which attributes break
  `identity_kept`."""
  changed = (readings[:, 1:] != readings[:, :1]) & held[:, None]
  frames = held.sum(0) * (readings.shape[1] - 1)
  with np.errstate(invalid='ignore', divide='ignore'):
    return changed.sum((0, 1)) / frames


def single_flip(readings):
  """Fraction of strips [S, F] of +-1 readings that go from absent to present in one change."""
  changes = (np.diff(readings, axis=1) != 0).sum(1)
  return float(((readings[:, 0] < 0) & (readings[:, -1] > 0) & (changes == 1)).mean())


def _prompt_text(prompt, names):
  """[A] +-1/0 -> "Smiling,-Male"."""
  return ','.join(('' if v > 0 else '-') + n for n, v in zip(names, prompt) if v != 0)
