"""mlxpt: a local LLM post-training workbench (SFT with LoRA/QLoRA/DoRA on MLX).

Importing `mlxpt` is cheap: it imports neither mlx nor textual. Modules that need mlx call
`mlxpt._blas.activate()` first so that, on Linux, the CPU build of mlx uses an optimised BLAS.
"""

__version__ = "0.1.0"

import os as _os

# transformers (used only for tokenizers) warns on import that PyTorch is missing; we never need it.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
_os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
