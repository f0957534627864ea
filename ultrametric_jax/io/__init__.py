"""Files in and out: HF safetensors, GGUF, the native Orbax format, tokenizers, the default
model's assets and the export format of routers."""
