"""The Llama model in Flax NNX: its config, RoPE and the decoder (no surgery here)."""
