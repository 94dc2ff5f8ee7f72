"""mask_chunks="auto": the traced-memory estimate and the rule that turns it into chunks."""

import chex
import jax
import jax.numpy as jnp
import pytest

from awm_jax.defenses.awm import AWMConfig, Frozen, make_awm_steps
from awm_jax.defenses.awm.chunking import (
    CPU_CHUNK_BYTES,
    chunk_budget_bytes,
    choose_chunks,
    estimate_buffer_bytes,
    jaxpr_intermediate_bytes,
)
from awm_jax.models import create_model, init_variables


def test_choose_chunks_takes_the_fewest_that_fit_the_budget():
    assert choose_chunks(5.4e9, 128, 1.5e9) == 4
    assert choose_chunks(1.5e9, 128, 1.5e9) == 1
    assert choose_chunks(1.6e9, 128, 1.5e9) == 2
    assert choose_chunks(1.503e9, 128, 0.7e9) == 4  # 3 would fit: powers of two only
    assert choose_chunks(5.34e9, 128, 0.7e9) == 8
    assert choose_chunks(0, 128, 1.5e9) == 1
    assert choose_chunks(1e15, 6, 1.0) == 6  # at most one image per chunk
    assert choose_chunks(1e15, 128, None) == 1  # no known limit: never split


@pytest.mark.parametrize("args,match", [((-1, 8, 1e9), "buffer_bytes"),
                                        ((1e9, 0, 1e9), "batch_size"),
                                        ((1e9, 8, 0.0), "budget_bytes")])
def test_choose_chunks_rejects_nonsense(args, match):
    with pytest.raises(ValueError, match=match):
        choose_chunks(*args)


def test_jaxpr_bytes_count_every_output_including_nested_jits():
    x = jnp.zeros((100,), jnp.float32)
    flat = jax.make_jaxpr(lambda v: jnp.sin(v) * 2.0)(x).jaxpr
    assert jaxpr_intermediate_bytes(flat) == 2 * 400
    nested = jax.make_jaxpr(lambda v: jax.jit(lambda w: jnp.sin(w) * 2.0)(v) + 1.0)(x).jaxpr
    # The jit's own output, the two equations inside it, and the addition.
    assert jaxpr_intermediate_bytes(nested) == 4 * 400


def test_estimate_scales_with_the_batch_and_needs_no_concrete_arrays():
    model = create_model("small_cnn", 3, features=(4, 6))
    variables = init_variables(model, jax.random.key(0), (8, 8, 1))

    def loss(params, images):
        return model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                           images).sum()

    grad = jax.grad(loss)
    small = estimate_buffer_bytes(grad, variables["params"], jnp.zeros((16, 8, 8, 1)))
    large = estimate_buffer_bytes(grad, variables["params"],
                                  jax.ShapeDtypeStruct((64, 8, 8, 1), jnp.float32))
    assert 0 < small < large
    # Activations dominate: 4x the batch is close to 4x the memory.
    assert 3.0 < large / small <= 4.0


def test_cpu_budget():
    assert chunk_budget_bytes(jax.devices("cpu")[0]) == CPU_CHUNK_BYTES


def _abstract_case(model_name, batch_size, num_clean, **model_kwargs):
    """The steps and abstract inputs of an AWM run, without initialising any weights."""
    model = create_model(model_name, 10, **model_kwargs)
    variables = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), (32, 32, 3)))
    frozen = Frozen(variables["params"], variables["batch_stats"])
    data = {"image": jax.ShapeDtypeStruct((num_clean, 32, 32, 3), jnp.float32),
            "label": jax.ShapeDtypeStruct((num_clean,), jnp.int32)}
    config = AWMConfig(batch_size=batch_size)
    steps = make_awm_steps(model, config, num_clean)
    state = jax.eval_shape(steps.init, frozen.params, data, config.hparams())
    return steps, state, frozen, data, config.hparams()


def test_auto_splits_the_large_resnet_batch_on_cpu_but_not_the_one_shot_model():
    """The measured cases (perf_notes.md sections 5, 6 and 10): ResNet-18 width 64 at batch 128
    (4.94 GB whole; 8 chunks fastest on Zen 5), width 32 (2.5 GB; 4 chunks, also with the
    weight-gradient rule of section 10, where the estimate alone would give 3), and the
    one-shot small VGG at batch 32 (257 MB; fastest whole on the first machine)."""
    steps, *case = _abstract_case("resnet18", 128, 500, width=64)
    assert steps.mask_chunks_for(*case) == 8
    steps, *case = _abstract_case("resnet18", 128, 500, width=32)
    assert steps.mask_chunks_for(*case) == 4
    steps, *case = _abstract_case("small_vgg", 32, 100)
    assert steps.mask_chunks_for(*case) == 1


@pytest.mark.parametrize("jit", [False, True])
def test_auto_mask_step_equals_an_explicit_count(jit):
    model = create_model("small_cnn", 3, features=(4, 6))
    variables = init_variables(model, jax.random.key(0), (8, 8, 1))
    frozen = Frozen(variables["params"], variables["batch_stats"])
    data = {"image": jax.random.uniform(jax.random.key(1), (12, 8, 8, 1)),
            "label": jnp.arange(12, dtype=jnp.int32) % 3}
    outcomes = []
    for mask_chunks in ("auto", 1):
        config = AWMConfig(batch_size=4, tau=5.0, mask_lr=0.05, mask_chunks=mask_chunks)
        steps = make_awm_steps(model, config, 12)
        state = steps.init(frozen.params, data, config.hparams())
        state = state.replace(trigger=0.2 * jnp.ones_like(state.trigger))
        assert steps.mask_chunks_for(state, frozen, data, config.hparams()) == 1
        step = jax.jit(steps.mask_step) if jit else steps.mask_step
        outcomes.append(step(state, frozen, data, jax.random.key(2), config.hparams()))
    chex.assert_trees_all_equal(outcomes[0], outcomes[1])
