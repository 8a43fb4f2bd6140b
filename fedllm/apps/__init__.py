"""The Flower apps (ServerApp, ClientApp), the round loop, the wire format, the simulation
runner and the ``fedllm`` command."""
