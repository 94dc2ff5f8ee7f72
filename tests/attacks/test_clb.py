"""CLB: PGD stays in the eps-ball and raises a clean model's loss; the trigger is corner patches."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from awm_jax.attacks import create_attack, poison_training_set, triggered_test_set
from awm_jax.attacks.clb import adversarial_perturb, make_clb_poison
from awm_jax.data.dataset import Split

SHAPE = (6, 6, 1)


def _linear_model(num_classes=3):
    weights = jax.random.normal(jax.random.key(0), (int(np.prod(SHAPE)), num_classes))
    return lambda x: x.reshape(x.shape[0], -1) @ weights


def _loss(logits_fn, images, labels):
    return float(optax.softmax_cross_entropy_with_integer_labels(logits_fn(images), labels).mean())


@pytest.mark.parametrize("jit", [False, True])
def test_pgd_stays_within_eps_and_raises_the_clean_loss(jit):
    logits_fn = _linear_model()
    images = jax.random.uniform(jax.random.key(1), (4,) + SHAPE, minval=0.1, maxval=0.9)
    labels = jnp.array([0, 1, 2, 0])
    perturb = jax.jit(adversarial_perturb, static_argnums=(2, 5)) if jit else adversarial_perturb
    eps = 8 / 255
    out = perturb(images, labels, logits_fn, jax.random.key(2), eps, 5, 2 / 255)
    assert float(jnp.abs(out - images).max()) <= eps + 1e-6
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert _loss(logits_fn, out, labels) > _loss(logits_fn, images, labels) + 0.05


@pytest.mark.parametrize("jit", [False, True])
def test_test_time_trigger_is_checkerboards_in_the_four_corners(jit):
    attack = create_attack("clb", target=1, patch_size=2, num_classes=3)
    apply = jax.jit(attack.apply_trigger) if jit else attack.apply_trigger
    images = jnp.full((1, 6, 6, 2), 0.5)
    out = np.asarray(apply(images, jax.random.key(0)))[0, ..., 0]
    corners = np.zeros((6, 6), bool)
    for rows in (slice(0, 2), slice(4, 6)):
        for cols in (slice(0, 2), slice(4, 6)):
            corners[rows, cols] = True
    assert np.all(out[~corners] == 0.5)
    board, mirrored = np.eye(2), np.eye(2)[::-1]  # checkerboards, white at each corner pixel
    np.testing.assert_array_equal(out[:2, :2], board)
    np.testing.assert_array_equal(out[:2, 4:], mirrored)
    np.testing.assert_array_equal(out[4:, :2], mirrored)
    np.testing.assert_array_equal(out[4:, 4:], board)
    assert attack.clean_label and attack.target == 1
    with pytest.raises(ValueError, match="do not fit"):
        create_attack("clb", patch_size=4).apply_trigger(images, None)


def test_poisoning_perturbs_target_images_then_stamps_patches():
    logits_fn = _linear_model()
    rng = np.random.default_rng(0)
    split = Split(rng.uniform(0.2, 0.8, (12,) + SHAPE).astype(np.float32),
                  (np.arange(12) % 3).astype(np.int32))
    attack = create_attack("clb", target=1, patch_size=1, eps=4 / 255, steps=3)
    poison = make_clb_poison(attack, logits_fn)
    assert poison.clean_label and poison.params == attack.params
    result = poison_training_set(split, poison, jax.random.key(0), rate=1.0)
    chosen = result.poisoned
    assert np.array_equal(chosen, split.labels == 1)
    np.testing.assert_array_equal(result.split.labels, split.labels)
    delta = result.split.images[chosen] - split.images[chosen]
    assert np.abs(delta[:, 1:-1, 1:-1]).max() <= 4 / 255 + 1e-6  # adversarial in the middle
    assert np.abs(delta[:, 1:-1, 1:-1]).max() > 0
    assert np.all(result.split.images[chosen][:, [0, 0, -1, -1], [0, -1, 0, -1]] == 1.0)
    test = triggered_test_set(split, attack, jax.random.key(1))
    np.testing.assert_array_equal(test.images[:, 1:-1, 1:-1], split.images[:, 1:-1, 1:-1])
    with pytest.raises(ValueError, match="must be a 'clb' attack"):
        make_clb_poison(create_attack("sig"), logits_fn)
    with pytest.raises(ValueError, match="eps"):
        make_clb_poison(attack, logits_fn, eps=2.0)
