"""Parallel training: applied to the model from outside (torch.distributed, FSDP2, expert parallelism)."""
