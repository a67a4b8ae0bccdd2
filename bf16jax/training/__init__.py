"""Training: the trainer, the pure steps, the loop, optimizers, and everything a run owns.

Owns `Trainer` (a config made into sharded, jitted programs), `train_step` / `eval_step`, the
loop (data, eval, checkpoints, samples, preemption, divergence), optimizers and update rules
from config, the run directory, metric writers and FLOPs/MFU, start-up preflight checks, and
reading pretrained (converted) checkpoints for `init_from`.
May import: config, evaluation, checkpoint, interop, data, models, nn, precision, parallel.
"""
