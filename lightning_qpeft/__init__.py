"""lightning_qpeft: fine-tune quantized LLaMA-family models with PEFT adapters, with PyTorch Lightning."""

__version__ = "0.1.0"
