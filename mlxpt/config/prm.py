"""Settings of a process reward model (`mlxpt train prm`): SFT's sections plus `prm`."""

from __future__ import annotations

from dataclasses import dataclass, field

from mlxpt.config.sections import (
    ASSETS,
    OTHER_OWNERS,
    AdapterConfig,
    DataConfig,
    ModelConfig,
    Sections,
    TrainConfig,
    opt,
)


def default_step_data() -> str:
    return str(ASSETS / "prm")


@dataclass
class PRMSection:
    step_delimiter: str = opt(
        "\\n",
        "text that ends every step (\\n, \\t and \\\\ are read as escapes); step search splits on the same text",
    )


@dataclass
class PRMConfig(Sections):
    """Process reward model: a scalar head on a LoRA-tuned backbone, read at the end of every step
    of stepwise-supervision rows and trained by binary cross-entropy."""

    UNUSED = ("packing",)  # rows are not packed for this method

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(data=default_step_data()))
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prm: PRMSection = field(default_factory=PRMSection)


OTHER_OWNERS["prm"] = PRMConfig  # a prm setting given to another method names prm
