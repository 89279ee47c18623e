"""Pretraining: the loop, its optimizer and schedule, checkpoints, loss-spike recovery, DDP/FSDP."""
