"""`engine = "vllm"`: the appliance runs and supervises `vllm serve`."""
