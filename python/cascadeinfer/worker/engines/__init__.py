"""Engine implementations. `vllm` is imported lazily: only `engines/vllm_engine.py` imports vLLM."""
