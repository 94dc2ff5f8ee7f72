"""The trigger's L1 constraint: the official rescale and the exact projection."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awm_jax.defenses.awm.trigger import l1_rescale, project_l1_ball

SEEDS = range(5)


def _random_trigger(seed, scale):
    return scale * jax.random.normal(jax.random.key(seed), (4, 4, 3))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("jit", [False, True])
def test_rescale_lands_on_sphere_and_keeps_direction(seed, jit):
    delta = _random_trigger(seed, 5.0)
    tau = 3.0
    out = (jax.jit(l1_rescale) if jit else l1_rescale)(delta, tau)
    np.testing.assert_allclose(jnp.abs(out).sum(), tau, rtol=1e-5)
    np.testing.assert_allclose(out / jnp.abs(out).sum(), delta / jnp.abs(delta).sum(), atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("jit", [False, True])
def test_rescale_is_identity_inside_ball(seed, jit):
    delta = _random_trigger(seed, 0.01)
    out = (jax.jit(l1_rescale) if jit else l1_rescale)(delta, 100.0)
    chex.assert_trees_all_close(out, delta)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("jit", [False, True])
def test_projection_inside_ball_identity_and_idempotent(seed, jit):
    project = jax.jit(project_l1_ball) if jit else project_l1_ball
    tau = 2.0
    outside = _random_trigger(seed, 3.0)
    projected = project(outside, tau)
    assert float(jnp.abs(projected).sum()) <= tau * (1 + 1e-5)
    chex.assert_trees_all_close(project(projected, tau), projected, atol=1e-6)
    inside = _random_trigger(seed, 1e-3)
    chex.assert_trees_all_close(project(inside, tau), inside, atol=1e-7)
    # The projection is the closest point in the ball: no random point of the ball is closer.
    candidates = jax.random.normal(jax.random.key(seed + 10), (64, 4, 4, 3))
    candidates = jax.vmap(lambda c: l1_rescale(c, tau))(candidates)
    distance = jnp.linalg.norm(outside - projected)
    assert bool(jnp.all(jax.vmap(lambda c: jnp.linalg.norm(outside - c))(candidates)
                        >= distance - 1e-5))
