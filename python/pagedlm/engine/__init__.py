"""The serving engine: requests, a continuous-batching scheduler over the C++ BlockManager,
and a model runner that runs each scheduled step (a speculative method's drafts included) and
returns the tokens to emit."""
