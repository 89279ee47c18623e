"""Fine-tuning: transforms and objectives applied to a built model (LoRA, SFT, DPO)."""
