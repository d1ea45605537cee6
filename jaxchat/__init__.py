"""jaxchat: train your own small ChatGPT from scratch in JAX/Flax NNX."""
