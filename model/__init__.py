"""Pure PyTorch: the GPT, its training loop, LoRA, quantization, generation. Never imports Prefect."""
