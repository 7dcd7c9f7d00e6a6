"""Online serving: pagedlm.AsyncLLM (the engine in a background thread, an asyncio API with
streamed outputs) and an OpenAI-compatible HTTP server on it (`pagedlm serve`, serving.app).

AsyncLLM needs nothing beyond pagedlm (and prometheus_client for its metrics); the server
needs the `serve` extra: fastapi, uvicorn, jinja2, prometheus-client.
"""
from pagedlm.serving.async_llm import (AsyncLLM, EngineOverloaded, EngineStopped, PromptTooLong, RequestFailed,
                                       RequestStream, SampleDelta, StreamOutput)

__all__ = ["AsyncLLM", "RequestStream", "StreamOutput", "SampleDelta", "RequestFailed", "EngineOverloaded",
           "EngineStopped", "PromptTooLong"]
