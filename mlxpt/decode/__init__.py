"""Generation: samplers, chat prompts and streaming decode (mlx imported lazily)."""

from mlxpt.decode.generate import (
    GenerationChunk,
    add_stop_tokens,
    chat_prompt,
    generate_text,
    iter_generate,
)
from mlxpt.decode.sampling import SamplingConfig, make_sampler, validate_sampling

__all__ = [
    "GenerationChunk",
    "SamplingConfig",
    "add_stop_tokens",
    "chat_prompt",
    "generate_text",
    "iter_generate",
    "make_sampler",
    "validate_sampling",
]
