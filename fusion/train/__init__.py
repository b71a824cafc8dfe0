"""Training: patient bags and batching, patient-level CV splits, the fit loop, checkpoints."""
