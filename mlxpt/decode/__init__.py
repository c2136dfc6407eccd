"""Generation: samplers, chat prompts, streaming decode and the decoding strategies (mlx imported lazily)."""

from mlxpt.decode.generate import (
    GenerationChunk,
    add_stop_tokens,
    chat_prompt,
    generate_text,
    iter_generate,
)
from mlxpt.decode.options import DecodeConfig
from mlxpt.decode.sampling import SamplingConfig, make_sampler, validate_sampling
from mlxpt.decode.strategies import STRATEGIES, StrategyResult, run_strategy

__all__ = [
    "STRATEGIES",
    "DecodeConfig",
    "GenerationChunk",
    "SamplingConfig",
    "StrategyResult",
    "add_stop_tokens",
    "chat_prompt",
    "generate_text",
    "iter_generate",
    "make_sampler",
    "run_strategy",
    "validate_sampling",
]
