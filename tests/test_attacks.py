"""FGSM / PGD under a policy: closed form on a linear model, budgets, int8 deployment."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from bf16jax.evaluation import attacks
from bf16jax.models import build_model
from bf16jax.nn import quant_model


def _linear_problem():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(12, 4)), jnp.float32)
    x = jnp.asarray(rng.uniform(0.2, 0.8, size=(16, 12)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, 16), jnp.int32)
    return (lambda images: images @ w), w, x, y


def _ce(logits, y):
    return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], -1))


def test_fgsm_is_the_signed_gradient_step():
    f, w, x, y = _linear_problem()
    eps = 0.1
    grad = (jax.nn.softmax(f(x)) - jax.nn.one_hot(y, 4)) @ w.T  # d CE / dx, closed form
    want = jnp.clip(x + eps * jnp.sign(grad), 0.0, 1.0)
    np.testing.assert_array_equal(attacks.fgsm(f, x, y, eps), want)


def test_pgd_stays_in_the_budget_and_raises_the_loss():
    f, _, x, y = _linear_problem()
    eps = 0.05
    adv = attacks.pgd(f, x, y, eps, key=jax.random.key(0), steps=5)
    assert float(jnp.max(jnp.abs(adv - x))) <= eps + 1e-6
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    assert float(_ce(f(adv), y)) > float(_ce(f(x), y))
    assert float(_ce(f(adv), y)) >= float(_ce(f(attacks.fgsm(f, x, y, eps)), y)) - 1e-4


def _tiny_vit(policy):
    cfg = ml_collections.ConfigDict(
        dict(
            name="vit",
            image_size=8,
            patch_size=4,
            channels=1,
            num_classes=10,
            embed_dim=16,
            num_layers=1,
            num_heads=2,
            mlp_dim=32,
            attention_impl="",
        )  # fmt: skip
    )
    return build_model(cfg, policy, rngs=nnx.Rngs(0))


def test_int8_deployment_is_attacked_through_its_fake_quant_model():
    model = _tiny_vit("fp32; q=w8a8")
    int8 = quant_model.to_int8(nnx.clone(model))
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 1, (24, 8, 8, 1)).astype(np.float32)
    # Labels the model gets right: clean accuracy 1, so every drop is the attack's.
    labels = np.asarray(jnp.argmax(model(jnp.asarray(images)), -1))
    epsilons = (0.0, 0.3)
    fake = attacks.adversarial_accuracy(model, model, [(images, labels)], epsilons, pgd_steps=3)
    real = attacks.adversarial_accuracy(model, int8, [(images, labels)], epsilons, pgd_steps=3)
    assert fake == real  # int8 inference is bit-exact with fake-quant: same predictions
    assert fake["fgsm"][0.0] == fake["pgd"][0.0] == 1.0
    assert fake["pgd"][0.3] < 0.5 and fake["fgsm"][0.3] < 1.0
    with pytest.raises(ValueError, match="no examples"):
        attacks.adversarial_accuracy(model, model, [], epsilons)
