"""SweepSpec: members, stacking, keys that match the single-run pipeline, clear errors."""

import jax
import numpy as np
import pytest

from awm_jax.defenses.awm import AWMConfig
from awm_jax.sweep.spec import SWEEPABLE, SweepSpec, member_keys


def test_members_are_grid_product_times_zip_times_seeds():
    spec = SweepSpec(grid={"alpha": [0.8, 0.9], "tau": [50, 100]},
                     zip={"gamma": [1e-8, 1e-6], "mask_lr": [0.01, 0.02]}, seeds=[0, 1])
    members = spec.members()
    assert len(members) == 2 * 2 * 2 * 2
    assert members[0] == {"alpha": 0.8, "tau": 50, "gamma": 1e-8, "mask_lr": 0.01, "seed": 0}
    assert {(m["gamma"], m["mask_lr"]) for m in members} == {(1e-8, 0.01), (1e-6, 0.02)}
    assert [m["seed"] for m in members] == [0] * 8 + [1] * 8


def test_stack_gives_member_axis_and_pipeline_keys():
    base = AWMConfig(gamma=1e-5)
    spec = SweepSpec(grid={"alpha": [0.8, 0.9]}, seeds=[3, 4])
    hparams, keys = spec.stack(base)
    assert hparams.alpha.shape == (4,) and hparams.alpha.dtype == np.float32
    np.testing.assert_allclose(hparams.alpha, [0.8, 0.9, 0.8, 0.9], rtol=1e-6)
    np.testing.assert_allclose(hparams.beta, [0.2, 0.1, 0.2, 0.1], rtol=1e-5)  # tied
    np.testing.assert_allclose(hparams.gamma, [1e-5] * 4, rtol=1e-6)
    expected = jax.random.split(jax.random.key(4), 3)[2]  # purify_model's defense key
    np.testing.assert_array_equal(jax.random.key_data(keys[3]), jax.random.key_data(expected))
    np.testing.assert_array_equal(jax.random.key_data(member_keys(3)["defense"]),
                                  jax.random.key_data(keys[0]))


@pytest.mark.parametrize("kwargs,match", [
    ({"grid": {"outer_epochs": [1, 2]}}, "static config fields"),
    ({"grid": {"alhpa": [0.1]}}, "sweepable names"),
    ({"zip": {"alpha": [0.1, 0.2], "tau": [1.0]}}, "equal lengths"),
    ({"grid": {"alpha": [0.1]}, "zip": {"alpha": [0.2]}}, "both grid and zip"),
    ({"grid": {"alpha": []}}, "is empty"),
    ({"seeds": []}, "seeds is empty"),
])
def test_spec_rejects_nonsense(kwargs, match):
    with pytest.raises(ValueError, match=match) as error:
        SweepSpec(**kwargs)
    if "sweepable" in str(error.value):
        assert all(name in str(error.value) for name in SWEEPABLE)


def test_out_of_range_values_and_tied_beta_are_rejected_at_stack():
    with pytest.raises(ValueError, match="alpha must be in"):
        SweepSpec(grid={"alpha": [1.5]}).stack(AWMConfig())
    with pytest.raises(ValueError, match="explicit beta"):
        SweepSpec(grid={"beta": [0.1]}).stack(AWMConfig())
    hparams, _ = SweepSpec(grid={"beta": [0.1, 0.3]}).stack(AWMConfig(beta=0.5))
    np.testing.assert_allclose(hparams.beta, [0.1, 0.3], rtol=1e-6)
