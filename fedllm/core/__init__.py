"""fedllm's core: shared types, registries, flat vectors and the embedded-model store.

Everything else builds on this layer, and the plugin packages (``fedllm.channels``,
``fedllm.strategies``, ``fedllm.clients``) import nothing of fedllm but it.
"""
