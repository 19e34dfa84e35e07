"""qatune: quantization-aware fine-tuning of Llama-family models, with int4 checkpoints runtimes serve."""

__version__ = "0.1.0"
