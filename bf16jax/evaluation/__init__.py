"""Evaluation beyond the loss: calibration, agreement, robustness to shifted and attacked inputs.

Owns the metrics of predictions (accuracy, NLL, ECE and reliability bins, agreement), the
distribution shifts and adversarial attacks used to probe robustness, and the held-out
evaluation that combines them. Shared by training (eval steps) and serving (evaluate, gate).
May import: config, data, models, nn, precision, parallel.
"""
