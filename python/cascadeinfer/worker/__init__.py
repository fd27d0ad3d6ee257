"""cascade-worker: a gRPC daemon hosting one engine (vLLM or the simulator) with KV export/import."""
