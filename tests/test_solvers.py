"""Solvers, guidance and inversion against models whose optimal outputs are analytic."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdiff_jax.diffusion import (
  ddim_invert,
  ddim_sigma,
  dpmpp_2m_sample,
  guided_output,
  make_schedule,
  sample,
  sampling_timesteps,
)
from fdiff_jax.errors import UserError

SHAPE = (2, 4, 4, 3)
ATTRS = jnp.array([[1.0, -1.0, 0.0], [0.5, 1.0, -1.0]])
X_STAR = jax.random.uniform(jax.random.key(0), SHAPE, minval=-1, maxval=1)
X_T = jax.random.normal(jax.random.key(1), SHAPE)


def _coefficients(schedule, t):
  """sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t) shaped to broadcast over images."""
  return (
    schedule.sqrt_alpha_bars[t][:, None, None, None],
    schedule.sqrt_one_minus_alpha_bars[t][:, None, None, None],
  )


def _as_output(schedule, t, eps, x0, prediction):
  """The eps- or v-model output with these (eps, x0) predictions."""
  alpha, sigma = _coefficients(schedule, t)
  return eps if prediction == 'eps' else alpha * eps - sigma * x0


def single_image_model(schedule, x_star, prediction='eps'):
  """Exact model for data = one fixed image per example (batch may be CFG-doubled)."""

  def model_fn(x, t, attributes):
    del attributes
    target = jnp.tile(x_star, (x.shape[0] // x_star.shape[0], 1, 1, 1))
    alpha, sigma = _coefficients(schedule, t)
    return _as_output(schedule, t, (x - alpha * target) / sigma, target, prediction)

  return model_fn


def gaussian_model(schedule, mean_std, prediction='eps'):
  """Exact model for data ~ N(mean, std^2 I): eps and x0 are linear in x_t."""
  mean, std = mean_std

  def model_fn(x, t, attributes):
    del attributes
    alpha, sigma = _coefficients(schedule, t)
    variance = alpha**2 * std**2 + sigma**2
    eps = sigma * (x - alpha * mean) / variance
    x0 = mean + alpha * std**2 * (x - alpha * mean) / variance
    return _as_output(schedule, t, eps, x0, prediction)

  return model_fn


def gaussian_flow(schedule, mean, std, x_T):
  """Exact probability-flow ODE map from t = T-1 to data for N(mean, std^2): keeps quantiles."""
  ab = schedule.alpha_bars[-1]
  return mean + std * (x_T - jnp.sqrt(ab) * mean) / jnp.sqrt(ab * std**2 + 1 - ab)


GAUSS_MEAN = jax.random.uniform(jax.random.key(2), (1,) + SHAPE[1:], minval=-0.5, maxval=0.5)
GAUSS_STD = 0.5
GAUSS = (GAUSS_MEAN, GAUSS_STD)


@functools.partial(
  jax.jit, static_argnames=('model', 'prediction', 'sampler', 'steps', 'eta', 'clip_x0')
)
def _sample(
  schedule,
  model_params,
  x_T,
  attributes,
  rng,
  guidance=1.0,
  *,
  model,
  sampler,
  steps,
  eta=0.0,
  prediction='eps',
  clip_x0=True,
):
  """`sample` with model = model(schedule, model_params, prediction), compiled once per setup."""
  return sample(
    model(schedule, model_params, prediction),
    schedule,
    x_T,
    attributes,
    rng,
    sampler=sampler,
    steps=steps,
    guidance=guidance,
    eta=eta,
    prediction=prediction,
    clip_x0=clip_x0,
  )


@functools.partial(jax.jit, static_argnames=('model', 'prediction', 'steps'))
def _invert(
  schedule, model_params, x0, attributes, guidance=1.0, *, model, steps, prediction='eps'
):
  """`ddim_invert`, compiled like _sample."""
  return ddim_invert(
    model(schedule, model_params, prediction),
    schedule,
    x0,
    attributes,
    steps=steps,
    guidance=guidance,
    prediction=prediction,
  )


@pytest.mark.parametrize('kind', ['linear', 'cosine'])
@pytest.mark.parametrize('prediction', ['eps', 'v'])
@pytest.mark.parametrize('sampler,steps', [('ddpm', 1000), ('ddim', 50), ('dpm++', 20)])
def test_samplers_return_the_single_training_image(kind, prediction, sampler, steps):
  out = _sample(
    make_schedule(kind),
    X_STAR,
    X_T,
    ATTRS,
    jax.random.key(3),
    3.0,
    model=single_image_model,
    sampler=sampler,
    steps=steps,
    prediction=prediction,
  )
  np.testing.assert_allclose(out, X_STAR, atol=1e-5)


def test_sampling_timesteps_grid():
  np.testing.assert_array_equal(sampling_timesteps(1000, 4), [999, 749, 499, 249])
  np.testing.assert_array_equal(sampling_timesteps(10, 10), np.arange(9, -1, -1))
  grid = sampling_timesteps(1000, 30)
  assert grid[0] == 999 and np.all(np.isin(-np.diff(grid), [33, 34]))
  with pytest.raises(UserError, match='steps'):
    sampling_timesteps(100, 101)
  with pytest.raises(UserError, match='steps'):
    sampling_timesteps(100, 0)


def test_ddim_eta0_is_deterministic_and_eta1_is_not():
  run = lambda key, eta: _sample(
    make_schedule('linear', 100),
    GAUSS,
    X_T,
    ATTRS,
    key,
    2.0,
    model=gaussian_model,
    sampler='ddim',
    steps=20,
    eta=eta,
  )
  np.testing.assert_array_equal(run(jax.random.key(4), 0.0), run(jax.random.key(5), 0.0))
  assert float(jnp.abs(run(jax.random.key(4), 1.0) - run(jax.random.key(5), 1.0)).max()) > 0.1


@pytest.mark.parametrize('kind', ['linear', 'cosine'])
def test_ddim_eta1_sigma_is_the_ddpm_posterior_std(kind):
  schedule = make_schedule(kind)
  ab = np.asarray(schedule.alpha_bars, np.float64)
  sigma = ddim_sigma(ab[1:], ab[:-1], 1.0)
  np.testing.assert_allclose(sigma**2, schedule.posterior_variance[1:], rtol=2e-3)


def test_ddim_eta1_over_all_steps_is_ddpm():
  """Same keys, same noise per step: the two samplers follow the same path."""
  schedule = make_schedule('cosine', 100)
  run = functools.partial(
    _sample, schedule, GAUSS, X_T, ATTRS, jax.random.key(6), 2.0, model=gaussian_model, steps=100
  )
  ddpm = run(sampler='ddpm')
  np.testing.assert_allclose(run(sampler='ddim', eta=1.0), ddpm, atol=1e-4)
  assert float(jnp.std(ddpm - gaussian_flow(schedule, GAUSS_MEAN, GAUSS_STD, X_T))) > 0.1


def _flow_error(sampler, steps):
  """Mean |sample - exact ODE solution| for Gaussian data on the cosine schedule."""
  schedule = make_schedule('cosine')
  x_T = jax.random.normal(jax.random.key(7), (8,) + SHAPE[1:])
  out = _sample(
    schedule,
    GAUSS,
    x_T,
    None,
    jax.random.key(8),
    model=gaussian_model,
    sampler=sampler,
    steps=steps,
    clip_x0=False,
  )
  return float(jnp.mean(jnp.abs(out - gaussian_flow(schedule, GAUSS_MEAN, GAUSS_STD, x_T))))


def test_deterministic_samplers_solve_the_ode():
  """DDIM converges at first order; DPM-Solver++(2M) is far more accurate at equal steps."""
  ddim_20, ddim_40, dpmpp_20 = (
    _flow_error('ddim', 20),
    _flow_error('ddim', 40),
    _flow_error('dpm++', 20),
  )
  assert 0.4 < ddim_40 / ddim_20 < 0.6
  assert dpmpp_20 < ddim_20 / 10 and dpmpp_20 < 0.003


def _x_independent_model(schedule, field, prediction='eps'):
  """A model whose eps depends on t and the attributes but not on x."""

  def model_fn(x, t, attributes):
    scale = 1.0 + t[:, None, None, None] / 1000 + attributes.sum(-1)[:, None, None, None]
    eps = field * scale
    alpha, sigma = _coefficients(schedule, t)
    return _as_output(schedule, t, eps, (x - sigma * eps) / alpha, prediction)

  return model_fn


@pytest.mark.parametrize('prediction', ['eps', 'v'])
def test_ddim_inversion_is_exact_when_eps_does_not_depend_on_x(prediction):
  """eps(t, attributes) only: inversion's one approximation (eps at the wrong x) vanishes."""
  schedule = make_schedule('linear')
  field = jax.random.normal(jax.random.key(9), SHAPE[1:])
  setup = dict(model=_x_independent_model, steps=25, prediction=prediction)
  x_T = _invert(schedule, field, X_STAR, ATTRS, 3.0, **setup)
  assert float(jnp.abs(x_T - X_STAR).mean()) > 0.5
  back = _sample(
    schedule, field, x_T, ATTRS, jax.random.key(10), 3.0, sampler='ddim', clip_x0=False, **setup
  )
  # Up to float32 round-off, which the v <-> eps conversion amplifies at alpha_bar ~ 4e-5.
  np.testing.assert_allclose(back, X_STAR, atol=5e-4)


def _round_trip_error(steps):
  """Mean |ddim_sample(ddim_invert(x0)) - x0| for Gaussian data on the cosine schedule."""
  schedule = make_schedule('cosine')
  x0 = GAUSS_MEAN + GAUSS_STD * jax.random.normal(jax.random.key(11), (8,) + SHAPE[1:])
  x_T = _invert(schedule, GAUSS, x0, None, model=gaussian_model, steps=steps)
  back = _sample(
    schedule,
    GAUSS,
    x_T,
    None,
    jax.random.key(12),
    model=gaussian_model,
    sampler='ddim',
    steps=steps,
    clip_x0=False,
  )
  return float(jnp.mean(jnp.abs(back - x0)))


def test_ddim_inversion_round_trip_on_gaussian_data():
  """Inversion takes eps at the start of each step, not at its end as sampling does.

  For this smooth model that is an O(step) error per step, so the round trip is first
  order: ~2.5% of the data's std at 100 steps, halving when the steps double.
  """
  error_100, error_200 = _round_trip_error(100), _round_trip_error(200)
  assert error_100 < 0.05 * GAUSS_STD
  assert 0.4 < error_200 / error_100 < 0.65


def _recording_model():
  """A nonlinear attribute-conditioned toy model that logs the batch size of each call."""
  calls = []

  def model_fn(x, t, attributes):
    calls.append(x.shape[0])
    shift = jnp.tanh(attributes @ jnp.arange(1.0, 4.0))[:, None, None, None]
    return jnp.sin(x) * (1 + shift) + t[:, None, None, None] / 100

  return model_fn, calls


def test_guidance_endpoints_and_batching():
  model_fn, calls = _recording_model()
  t = jnp.array([3, 70], jnp.int32)
  cond = model_fn(X_T, t, ATTRS)
  uncond = model_fn(X_T, t, jnp.zeros_like(ATTRS))
  assert float(jnp.abs(cond - uncond).max()) > 0.1
  calls.clear()
  np.testing.assert_allclose(guided_output(model_fn, X_T, t, ATTRS, 0.0), uncond, atol=1e-6)
  np.testing.assert_allclose(
    guided_output(model_fn, X_T, t, ATTRS, jnp.float32(1.0)), cond, atol=1e-6
  )
  np.testing.assert_allclose(
    guided_output(model_fn, X_T, t, ATTRS, 2.5), uncond + 2.5 * (cond - uncond), atol=1e-5
  )
  assert calls == [4, 4, 4]  # one batched call with both branches each time
  calls.clear()
  np.testing.assert_array_equal(guided_output(model_fn, X_T, t, ATTRS, 1.0), cond)
  assert calls == [2]  # Python w == 1: the conditional call alone


def test_per_sample_guidance():
  model_fn, _ = _recording_model()
  t = jnp.array([3, 70], jnp.int32)
  both = guided_output(model_fn, X_T, t, ATTRS, jnp.array([0.0, 4.0]))
  for i, w in enumerate([0.0, 4.0]):
    np.testing.assert_allclose(both[i], guided_output(model_fn, X_T, t, ATTRS, w)[i], atol=1e-5)


def test_unconditional_model_gets_one_plain_call():
  calls = []

  def model_fn(x, t, attributes):
    calls.append(attributes)
    return x * 0.5

  out = guided_output(model_fn, X_T, jnp.array([1, 2], jnp.int32), None, 7.0)
  np.testing.assert_array_equal(out, X_T * 0.5)
  assert calls == [None]


@pytest.mark.parametrize('sampler', ['ddpm', 'ddim', 'dpm++'])
def test_jitted_sampler_traces_the_model_once(sampler):
  """The loop is one compiled program: one model trace per compile, whatever the steps."""
  schedule = make_schedule('linear', 40)
  model_fn, calls = _recording_model()
  jitted = jax.jit(
    functools.partial(sample, model_fn, schedule),
    static_argnames=('sampler', 'steps', 'prediction', 'clip_x0'),
  )
  run = lambda steps, w, seed=0: jitted(
    X_T + seed, ATTRS, jax.random.key(seed), sampler=sampler, steps=steps, guidance=jnp.array(w)
  )
  for steps in [40] if sampler == 'ddpm' else [4, 40]:
    calls.clear()
    mixed = run(steps, [1.5, 0.0])
    others = [run(steps, [1.5, 1.5]), run(steps, [0.0, 0.0]), run(steps, [3.0, 2.0], seed=1)]
    assert calls == [4]  # traced once (CFG-doubled batch), not retraced on new values
    # Per-sample guidance matches running each guidance value on its own.
    np.testing.assert_allclose(mixed[0], others[0][0], atol=1e-5)
    np.testing.assert_allclose(mixed[1], others[1][1], atol=1e-5)
    assert float(jnp.abs(others[0][1] - others[1][1]).max()) > 1e-3


def test_dispatcher_errors():
  schedule = make_schedule('linear', 40)
  model_fn, _ = _recording_model()
  with pytest.raises(UserError, match='unknown sampler'):
    sample(model_fn, schedule, X_T, ATTRS, jax.random.key(0), sampler='euler', steps=10)
  with pytest.raises(UserError, match="'ddpm' runs all 40 steps"):
    sample(model_fn, schedule, X_T, ATTRS, jax.random.key(0), sampler='ddpm', steps=10)
  with pytest.raises(UserError, match='eta must be in'):
    sample(model_fn, schedule, X_T, ATTRS, jax.random.key(0), sampler='ddim', steps=10, eta=1.5)
  with pytest.raises(UserError, match='unknown prediction'):
    dpmpp_2m_sample(model_fn, schedule, X_T, ATTRS, jax.random.key(0), steps=5, prediction='x0')
