"""Built-in passes; importing this package registers them (``qgraph passes`` lists them)."""

from . import fuse_norms, gptq, learn_rounding, mixed_precision, quantize, rotate  # noqa: F401
