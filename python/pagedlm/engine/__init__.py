"""The serving engine: requests, a continuous-batching scheduler over the C++ BlockManager,
and a model runner that turns each scheduled step into one forward over the paged cache."""
