"""The names of the records a message carries, in a module that imports nothing: the ClientApp's
identity query answers with them without loading torch (fedllm/apps/client_app.py)."""

GLOBAL = "global"
CONFIG = "config"
DELTA = "delta"
METRICS = "metrics"
NUM_EXAMPLES = "num-examples"
RAY_NODE = "ray_node"  # which machine of a Ray cluster trained (the first 48 bits of its Ray node id)
DOWN = "down."  # + a name: what the server sends besides the global group (e.g. a control variate)
