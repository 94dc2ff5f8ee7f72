"""I-BAU: the implicit hypergradient against a closed form, the pure inner and outer steps, and
a run on a real tiny backdoor."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from baseline_backdoor import tiny_backdoor

from awm_jax.defenses import purify
from awm_jax.defenses.ibau import (
    IBAUConfig,
    bound_perturbation,
    implicit_hypergradient,
    init_ibau_state,
    make_perturbation_step,
    make_unlearn_step,
    ordered_batches,
)
from awm_jax.models.base import create_model, init_variables


@pytest.fixture(scope="module")
def backdoor():
    return tiny_backdoor()


@pytest.mark.parametrize("field, value", [
    ("rounds", 0), ("batch_size", 0), ("fixed_point_steps", 0), ("learning_rate", 0.0),
    ("inner_learning_rate", -0.1), ("perturbation_learning_rate", 0.0),
    ("perturbation_penalty", -1e-3), ("perturbation_radius", 0.0), ("patch_fraction", 0.0),
    ("patch_fraction", 1.5)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        IBAUConfig(**{field: value})


def test_config_round_trips_and_allows_an_unbounded_perturbation():
    config = IBAUConfig(perturbation_radius=None, clip=False)
    assert IBAUConfig.from_dict(config.to_dict()) == config
    assert np.isinf(config.hparams().perturbation_radius)


def _quadratic(seed=0, n=4, m=3, eta=0.05):
    """Inner ``0.5 w'Aw - theta'Bw`` (minimiser ``A^-1 B' theta``), outer
    ``0.5 |w - c|^2 + d'theta``: the total derivative is ``B A^-1 (w* - c) + d``."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(n, n))
    a, b = q @ q.T + n * np.eye(n), rng.normal(size=(m, n))
    c, d, theta = rng.normal(size=n), rng.normal(size=m), rng.normal(size=m)
    inner = lambda w, th: 0.5 * w @ a @ w - th @ b @ w
    fixed_point_map = lambda w, th: w - eta * jax.grad(inner)(w, th)
    outer = lambda w, th: 0.5 * jnp.sum((w - c) ** 2) + d @ th
    w_star = np.linalg.solve(a, b.T @ theta)
    exact = b @ np.linalg.solve(a, w_star - c) + d
    one_step = d + eta * b @ (w_star - c)  # K = 1: v = dL/dw, then (dPhi/dtheta)' v
    cast = lambda x: jnp.asarray(x, jnp.float32)
    return outer, fixed_point_map, cast(w_star), cast(theta), exact, one_step


@pytest.mark.parametrize("jit", [False, True])
def test_implicit_hypergradient_matches_the_closed_form(jit):
    outer, fixed_point_map, w, theta, exact, one_step = _quadratic()
    hypergradient = lambda k: implicit_hypergradient(outer, fixed_point_map, w, theta, k)[0]
    if jit:
        hypergradient = jax.jit(hypergradient, static_argnums=0)
    np.testing.assert_allclose(hypergradient(1), one_step, rtol=1e-5, atol=1e-5)
    errors = [np.abs(np.asarray(hypergradient(k)) - exact).max() for k in (1, 5, 200)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-4


def _tiny():
    model = create_model("small_cnn", 3, features=(4,))
    variables = init_variables(model, jax.random.key(0), (8, 8, 1))
    batch = {"image": jax.random.uniform(jax.random.key(1), (6, 8, 8, 1)),
             "label": jnp.arange(6, dtype=jnp.int32) % 3}
    return model, variables, batch


def test_perturbation_step_is_one_sgd_ascent_step():
    model, variables, batch = _tiny()
    optimizer = optax.adam(1e-3)
    state = init_ibau_state(variables, optimizer, (8, 8, 1))
    state = state.replace(perturbation=jnp.full((8, 8, 1), 0.05))
    hparams = IBAUConfig().hparams()
    step = make_perturbation_step(model)
    eager, _ = step(state, batch, jax.random.key(0), hparams)
    jitted, _ = jax.jit(step)(state, batch, jax.random.key(0), hparams)
    chex.assert_trees_all_close(eager, jitted, atol=1e-5, rtol=1e-5)
    predicted = model.apply(variables, batch["image"]).argmax(-1)

    def loss(delta):
        logits = model.apply(variables, jnp.clip(batch["image"] + delta, 0.0, 1.0))
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, predicted).mean()
        return -ce + 1e-3 * jnp.sum(delta ** 2)

    expected = state.perturbation - 10.0 * jax.grad(loss)(state.perturbation)
    np.testing.assert_allclose(jitted.perturbation, expected, rtol=1e-4, atol=1e-6)
    assert float(loss(jitted.perturbation)) < float(loss(state.perturbation))  # CE went up
    chex.assert_trees_all_equal(jitted.params, variables["params"])


def test_bound_perturbation_scales_into_the_l2_ball():
    variables = _tiny()[1]
    state = init_ibau_state(variables, optax.adam(1e-3), (8, 8, 1))
    hparams = IBAUConfig(perturbation_radius=2.0).hparams()
    big = bound_perturbation(state.replace(perturbation=jnp.ones((8, 8, 1))), hparams)
    np.testing.assert_allclose(jnp.linalg.norm(big.perturbation), 2.0, rtol=1e-6)
    small = jnp.full((8, 8, 1), 0.1)  # norm 0.8: inside, unchanged
    np.testing.assert_array_equal(
        bound_perturbation(state.replace(perturbation=small), hparams).perturbation, small)


def test_unlearn_step_updates_weights_only_along_the_hypergradient():
    model, variables, batch = _tiny()
    optimizer = optax.sgd(0.5)
    state = init_ibau_state(variables, optimizer, (8, 8, 1))
    state = state.replace(perturbation=0.3 * jax.random.normal(jax.random.key(4), (8, 8, 1)))
    hparams = IBAUConfig().hparams()
    step = make_unlearn_step(model, optimizer, batch_size=6, patched=6, steps=2)
    jitted, metrics = jax.jit(step)(state, batch, jax.random.key(5), hparams)
    # With every image patched the outer loss is CE(x + delta): rebuild the update by hand.
    ce = lambda d, p, x: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p, "batch_stats": variables["batch_stats"]},
                    jnp.clip(x + d, 0.0, 1.0)), batch["label"]).mean()
    outer = lambda d, p: ce(d, p, batch["image"])
    inner = lambda d, p: -ce(d, p, batch["image"]) + 1e-3 * jnp.sum(d ** 2)
    phi = lambda d, p: d - 0.1 * jax.grad(inner)(d, p)
    grads, _ = jax.jit(implicit_hypergradient, static_argnums=(0, 1, 4))(
        outer, phi, state.perturbation, state.params, 2)
    expected = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, state.params, grads)
    chex.assert_trees_all_close(jitted.params, expected, atol=1e-5, rtol=1e-4)
    chex.assert_trees_all_equal(jitted.batch_stats, variables["batch_stats"])
    chex.assert_trees_all_equal(jitted.perturbation, state.perturbation)
    assert int(jitted.step) == 1 and float(metrics["finite"]) == 1.0


def test_ordered_batches_cover_every_image_and_wrap():
    batches = [np.asarray(b) for b in ordered_batches(7, 3)]
    assert [b.tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6, 0, 1]]


def test_official_preset_and_bad_preset():
    assert IBAUConfig.preset("official") == IBAUConfig(learning_rate=1e-3, batch_size=100)
    with pytest.raises(ValueError, match="unknown I-BAU preset 'x'; known: official"):
        IBAUConfig.preset("x")


def test_ibau_lowers_asr_on_a_real_backdoor(backdoor):
    # Official settings except three that depend on the data's size: batch 15 (10 outer steps
    # per round on 150 images instead of 50 on CIFAR's 5,000), 20% of each batch patched
    # (3 images; the code's 1% patches 1 per batch of 100), and an L2 radius of 3, the
    # notebook's 10 scaled to 16x16x1 inputs (10 * sqrt(256 / 3072) = 2.9). Measured (seeds
    # 0-2): ASR 0.99 -> 0.04-0.16, ACC 0.98 -> 0.79-0.80 after two rounds. The first round's
    # perturbation sends ~65% of clean images to the target; later rounds find ordinary
    # universal perturbations, and ASR creeps back up (0.26-0.36 after round 3), so two.
    config = IBAUConfig.preset("official", batch_size=15, patch_fraction=0.2,
                               perturbation_radius=3.0, rounds=2)
    result = purify("ibau", backdoor.model, backdoor.variables, backdoor.clean,
                    jax.random.key(0), config, num_classes=backdoor.num_classes,
                    progress=False)
    chex.assert_trees_all_equal_structs(result.variables, backdoor.variables)
    chex.assert_trees_all_equal(result.variables["batch_stats"],
                                backdoor.variables["batch_stats"])  # eval mode throughout
    assert result.details["steps"] == 20 and result.details["patched_per_batch"] == 3
    assert len(result.history) == 2 and all(np.isfinite(h["ce"]) for h in result.history)
    assert max(result.details["perturbation_l2"]) <= 3.0 + 1e-4
    after = backdoor.evaluate(result.variables)
    assert backdoor.before["asr"] > 0.9 and after["asr"] < 0.3
    assert after["acc"] > 0.7
    assert backdoor.evaluate(backdoor.variables) == backdoor.before  # input not donated
