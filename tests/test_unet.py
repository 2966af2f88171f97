"""U-Net: shapes, the unconditional input, attribute interpolation, presets' sizes; its
kernels: attention and GroupNorm against JAX's and flax's, the 'cpu' and 'xla' U-Nets alike,
`model.kernels` resolved at construction and optional in saved configs."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from fdiff_jax import checkpoints, config_utils
from fdiff_jax.errors import UserError
from fdiff_jax.models import PRESETS, UNet, build_model, count_params, init_params, kernels
from fdiff_jax.models.unet import AttributeEmbedding

TINY = dict(
  ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_heads=2, dropout=0.0
)


def _perturbed(params, seed):
  """Zero-initialised layers make a fresh U-Net output 0; perturb so outputs differ."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape, np.float32), params)


@pytest.fixture(scope='module')
def tiny():
  model = UNet(num_attributes=5, **TINY)
  x = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
  t = jnp.array([0, 10, 99])
  params = init_params(model, jax.random.key(0), (16, 16, 3))
  return model, _perturbed(params, 2), x, t


def test_output_shape_equals_input_shape(tiny):
  model, params, x, t = tiny
  out = jax.jit(model.apply)({'params': params}, x, t, jnp.ones((3, 5)))
  assert out.shape == x.shape and out.dtype == jnp.float32


def test_zero_attributes_equal_unconditional_call(tiny):
  model, params, x, t = tiny
  apply = jax.jit(model.apply)
  zeros = apply({'params': params}, x, t, jnp.zeros((3, 5)))
  none = apply({'params': params}, x, t, None)
  cond = apply({'params': params}, x, t, jnp.array([[1.0, -1, 0, 0, 1]] * 3))
  np.testing.assert_array_equal(zeros, none)
  assert float(jnp.abs(cond - zeros).max()) > 1e-3  # attributes do change the output


def test_attribute_embedding_is_linear_between_values():
  e = AttributeEmbedding(5, 8)
  p = _perturbed(e.init(jax.random.key(3), jnp.zeros((1, 5)))['params'], 4)
  f = lambda a: e.apply({'params': p}, jnp.asarray([a], jnp.float32))[0]
  one = jnp.array([1.0, 0, 0, 0, 0])
  np.testing.assert_allclose(f(0.5 * one), 0.5 * f(one), rtol=1e-6)
  np.testing.assert_allclose(f(-0.25 * one), 0.25 * f(-one), rtol=1e-6)
  np.testing.assert_array_equal(f(jnp.zeros(5)), jnp.zeros(8))
  assert float(jnp.abs(f(one) + f(-one)).max()) > 1e-4  # present and absent are distinct vectors


def test_unconditional_model_has_no_attribute_input():
  model = UNet(num_attributes=0, **TINY)
  x = jnp.zeros((2, 16, 16, 1))
  params = jax.eval_shape(model.init, jax.random.key(0), x, jnp.zeros((2,), jnp.int32))['params']
  assert not any('AttributeEmbedding' in k for k in params)
  assert (
    jax.eval_shape(model.apply, {'params': params}, x, jnp.zeros((2,), jnp.int32)).shape == x.shape
  )
  with pytest.raises(ValueError, match='unconditional'):
    jax.eval_shape(model.apply, {'params': params}, x, jnp.zeros((2,), jnp.int32), jnp.ones((2, 3)))


def test_bfloat16_compute_keeps_float32_params_and_output():
  model = UNet(num_attributes=2, dtype=jnp.bfloat16, **TINY)
  x = jnp.zeros((1, 16, 16, 3))
  params = jax.eval_shape(model.init, jax.random.key(0), x, jnp.zeros((1,)), jnp.zeros((1, 2)))[
    'params'
  ]
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  assert (
    jax.eval_shape(model.apply, {'params': params}, x, jnp.zeros((1,)), jnp.ones((1, 2))).dtype
    == jnp.float32
  )


def _preset_params(name, num_attributes=40):
  model = UNet(num_attributes=num_attributes, **PRESETS[name])
  x = jnp.zeros((1, 64, 64, 3))
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), x, jnp.zeros((1,)), jnp.zeros((1, num_attributes)))
  )
  return model, count_params(shapes['params'])


def test_original_preset_parameter_count_within_15_percent_of_1_38M():
  _, n = _preset_params('original')
  assert abs(n - 1.38e6) / 1.38e6 < 0.15, n


def test_celeba64_preset_parameter_count_about_35_to_40M():
  _, n = _preset_params('celeba64')
  assert 30e6 < n < 45e6, n


@pytest.mark.parametrize('name', sorted(PRESETS))
def test_presets_map_64x64_to_64x64(name):
  model, _ = _preset_params(name)
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  out = jax.eval_shape(
    lambda x: model.init_with_output(jax.random.key(0), x, jnp.zeros((2,)), jnp.zeros((2, 40)))[0],
    x,
  )
  assert out.shape == (2, 64, 64, 3)


@pytest.mark.parametrize(
  'variant,heads,piece_bytes',
  [
    ('xla', 1, 4 * 64 * 64),
    ('xla', 4, 4 * 64 * 64),
    ('cpu', 1, 16 * 2**20),
    ('cpu', 4, 16 * 2**20),
    ('cpu', 1, 4 * 64 * 64),
    ('cpu', 4, 3 * 4 * 64 * 64),
  ],
)
def test_attention_equals_jax_dot_product_attention_with_gradients(
  variant, heads, piece_bytes, monkeypatch
):
  """With the whole batch ('xla', whatever the piece size) and in pieces of all, 1 or 3 rows."""
  monkeypatch.setattr(kernels, 'CPU_ATTENTION_PIECE_BYTES', piece_bytes)
  q, k, v = (3 * jax.random.normal(jax.random.key(i), (2, 64, heads, 8)) for i in range(3))
  probe = jax.random.normal(jax.random.key(9), (2, 64, heads, 8))
  attention = lambda q, k, v: kernels.attention(q, k, v, variant)
  ours = lambda q, k, v: (attention(q, k, v) * probe).sum()
  ref = lambda q, k, v: (jax.nn.dot_product_attention(q, k, v) * probe).sum()
  np.testing.assert_allclose(
    attention(q, k, v), jax.nn.dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5
  )
  for g, r in zip(jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(ref, (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
  'channels,groups,dtype',
  [(8, 8, jnp.float32), (16, 8, jnp.float32), (24, 4, jnp.float32), (16, 8, jnp.bfloat16)],
)
def test_group_norm_equals_flax_group_norm_with_gradients(channels, groups, dtype):
  """Same parameters, values and gradients as nn.GroupNorm (groups of 1, 2 and 6 channels)."""
  x = (3 * jax.random.normal(jax.random.key(0), (2, 6, 5, channels)) + 1).astype(dtype)
  ours, ref = kernels.GroupNorm(groups, dtype=dtype), nn.GroupNorm(groups, dtype=dtype)
  params = ref.init(jax.random.key(1), x)
  assert jax.tree.structure(ours.init(jax.random.key(1), x)) == jax.tree.structure(params)
  params = _perturbed(params, 5)
  probe = jax.random.normal(jax.random.key(2), x.shape)
  loss = lambda m: lambda p, x: (m.apply(p, x).astype(jnp.float32) * probe).sum()
  tol = dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)
  y = ours.apply(params, x)
  assert y.dtype == dtype
  np.testing.assert_allclose(y.astype(jnp.float32), ref.apply(params, x).astype(jnp.float32), **tol)
  for g, r in zip(
    jax.tree.leaves(jax.grad(loss(ours), (0, 1))(params, x)),
    jax.tree.leaves(jax.grad(loss(ref), (0, 1))(params, x)),
  ):
    np.testing.assert_allclose(g.astype(jnp.float32), r.astype(jnp.float32), **tol)


def test_cpu_and_xla_unets_have_the_same_parameters_and_outputs(tiny, monkeypatch):
  """Checkpoints move between them; attention in pieces of 4 of the 6 rows."""
  monkeypatch.setattr(kernels, 'CPU_ATTENTION_PIECE_BYTES', 4 * 4 * 64 * 64)
  _, params, x, t = tiny
  a = jnp.array([[1.0, -1, 0, 0, 1]] * 3)
  cpu, xla = (UNet(num_attributes=5, kernels=variant, **TINY) for variant in ('cpu', 'xla'))
  shapes = {
    m.kernels: jax.eval_shape(m.init, jax.random.key(0), x, t, a)['params'] for m in (cpu, xla)
  }
  assert jax.tree.structure(shapes['cpu']) == jax.tree.structure(shapes['xla'])
  assert jax.tree.leaves(shapes['cpu']) == jax.tree.leaves(shapes['xla'])
  assert 'GroupNorm_0' in shapes['xla']['ResBlock_0']  # the names saved checkpoints use
  out_cpu, out_xla = (jax.jit(m.apply)({'params': params}, x, t, a) for m in (cpu, xla))
  assert float(jnp.abs(out_xla).max()) > 1e-2
  np.testing.assert_allclose(out_cpu, out_xla, rtol=1e-5, atol=1e-5)


def test_kernels_are_chosen_at_construction_not_by_the_backend_at_call(monkeypatch):
  """'auto' follows the backend in build_model; a built U-Net keeps its kernels."""
  monkeypatch.setattr(kernels, 'CPU_ATTENTION_PIECE_BYTES', 4 * 64 * 64)  # a piece per row
  config = test_config.get_config()
  cpu = build_model(config.model, 5)
  assert config.model.kernels == 'auto' and jax.default_backend() == 'cpu' and cpu.kernels == 'cpu'
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  xla = build_model(config.model, 5)
  assert xla.kernels == 'xla'
  config.model.kernels = 'cpu'
  assert build_model(config.model, 5).kernels == 'cpu'
  x, t, a = jnp.zeros((2, 16, 16, 3)), jnp.zeros((2,), jnp.int32), jnp.zeros((2, 5))
  params = jax.eval_shape(xla.init, jax.random.key(0), x, t, a)
  barriers = lambda m: str(jax.make_jaxpr(m.apply)(params, x, t, a)).count('optimization_barrier')
  assert barriers(cpu) > 0 and barriers(xla) == 0


def test_saved_config_without_model_kernels_loads_and_builds(tmp_path):
  config = test_config.get_config()
  saved = json.loads(config_utils.config_to_json(config))
  del saved['model']['kernels']
  (tmp_path / checkpoints.CONFIG_FILE).write_text(json.dumps(saved))
  loaded = checkpoints.load_config(str(tmp_path))
  config_utils.validate(loaded)
  model = build_model(loaded.model, 5)
  assert model.kernels == 'cpu'
  x = jnp.zeros((1, 16, 16, 3))
  out, _ = jax.eval_shape(
    model.init_with_output, jax.random.key(0), x, jnp.zeros((1,)), jnp.zeros((1, 5))
  )
  assert out.shape == x.shape


def test_unknown_kernels_is_a_user_error():
  config = test_config.get_config()
  config.model.kernels = 'gpu'
  with pytest.raises(
    UserError, match="unknown config.model.kernels 'gpu'; use one of auto, cpu, xla"
  ):
    config_utils.validate(config)
