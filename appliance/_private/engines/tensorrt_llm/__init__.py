"""`engine = "tensorrt_llm"`: the appliance runs and supervises `trtllm-serve`."""
