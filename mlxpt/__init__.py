"""mlxpt: a local LLM post-training workbench (SFT with LoRA/QLoRA/DoRA on MLX).

Importing `mlxpt` is cheap: it imports neither mlx nor textual. Modules that need mlx call
`mlxpt._blas.activate()` first so that, on Linux, the CPU build of mlx uses an optimised BLAS.
"""

__version__ = "0.1.0"
