"""Engines the appliance runs as child processes and supervises (vLLM, TensorRT-LLM)."""
