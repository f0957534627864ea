"""The PyTorch side: a transformers Llama with the routers (the only place that imports torch)."""
from ultrametric_jax.pytorch.surgical_llama import load_surgical_llama

__all__ = ["load_surgical_llama"]
