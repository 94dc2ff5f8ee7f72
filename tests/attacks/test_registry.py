"""The attack registry holds all ten attacks, each with the common Attack interface."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from awm_jax.attacks import ATTACKS, Attack, create_attack

NAMES = ["all_to_all", "badnets", "blend", "clb", "l0_inv", "l2_inv", "sig", "trojan_sq",
         "trojan_wm", "wanet"]


def test_registry_lists_all_ten_attacks_with_the_common_interface():
    assert ATTACKS.names() == NAMES
    images = jax.random.uniform(jax.random.key(0), (1, 16, 16, 3))
    for name in NAMES:
        attack = create_attack(name, num_classes=10)
        assert isinstance(attack, Attack) and attack.name == name
        out = jax.jit(attack.apply_trigger)(images, jax.random.key(1))  # the runner jits
        assert out.shape == images.shape and out.dtype == jnp.float32
        assert float(out.min()) >= 0 and float(out.max()) <= 1
        assert attack.target_label(jnp.arange(10)).shape == (10,)
        # Checkpoint metadata stores params as JSON and re-creates the attack from them.
        again = create_attack(name, **json.loads(json.dumps(attack.params)))
        assert again.params == attack.params and again.target == attack.target
        np.testing.assert_array_equal(np.asarray(jax.jit(again.apply_trigger)(images, None)),
                                      np.asarray(out))


def test_given_blend_pattern_round_trips_through_params():
    pattern = np.linspace(0, 1, 16 * 16 * 3, dtype=np.float32).reshape(16, 16, 3)
    attack = create_attack("blend", pattern=pattern)
    again = create_attack("blend", **json.loads(json.dumps(attack.params)))
    images = jnp.zeros((1, 16, 16, 3))
    np.testing.assert_allclose(np.asarray(again.apply_trigger(images, None)),
                               np.asarray(attack.apply_trigger(images, None)))
