"""What verl 0.9's loss functions fix by themselves, for the modules that map or replay them
without importing torch or verl (the replay's verl metrics, the verl mapping)."""

VERL_SEQ_LOG_RATIO_MAX = 10.0
"""verl's compute_policy_loss_gspo clamps GSPO's sequence log ratio at 10 (the spec's
log_ratio_max)."""
