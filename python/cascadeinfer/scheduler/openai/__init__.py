"""The scheduler's OpenAI-compatible HTTP front: /v1/completions, /v1/chat/completions,
/v1/models, /health and /metrics, served on the scheduler's own event loop next to its gRPC API.

`schema` holds the request and response models, `params` maps a request onto the worker's
sampling and refuses what is not supported, `model_files` and `chat_template` read the
tokenizer directory and render messages the way Hugging Face does, `textstream` turns spliced
tokens into text with stop strings, `generation` runs a request through the coordinator,
`replies` shapes the answers, `errors` maps refusals to statuses, `app` holds the routes, and
`server` runs it all under uvicorn.
"""
