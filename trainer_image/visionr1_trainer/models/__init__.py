"""Model loading and input encoding for Qwen2-VL / Qwen2.5-VL style models."""
