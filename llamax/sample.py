"""The published name of generation (`llamax.sample.generate`); it lives in `llamax.infer.generate`."""
from llamax.infer.generate import generate, generate_stream

__all__ = ["generate", "generate_stream"]
