"""Small ViT on scikit-learn's 8x8 digits (1797 images, 10 classes), bundled offline.

Launch:   python -m bf16jax.main --config=configs/vit_digits.py --workdir=runs/vit_digits
Hardware: CPU (about a minute on 2 cores); any GPU/TPU.
Expected: 16 patches of 2x2, 4 layers of width 64; held-out accuracy ~95% after 600 steps.
"""

from bf16jax.config import base_config


def get_config():
    c = base_config("vit")
    c.model.update(image_size=8, patch_size=2, embed_dim=64, num_layers=4, num_heads=4, mlp_dim=128)
    c.data.update(batch_size=64, eval_batch_size=120)
    c.optim.update(learning_rate=2e-3, warmup_steps=50, weight_decay=0.05, b2=0.999)
    c.train.update(steps=600, log_every=50, eval_every=200, eval_steps=3)
    c.checkpoint.update(every_steps=200)
    return c
