"""The scheduler's OpenAI-compatible HTTP front: /v1/completions, /v1/chat/completions,
/v1/models and /health, served on the scheduler's own event loop next to its gRPC API.

`schema` holds the request and response models, `params` maps a request onto the worker's
sampling and refuses what is not supported, `chat_template` renders messages the way Hugging
Face does, `textstream` turns spliced tokens into text with stop strings, `app` holds the
routes, and `server` runs it all under uvicorn.
"""
