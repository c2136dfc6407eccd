"""Settings as small dataclasses (sections.py: each field carries the one-line help text the CLI
and the TUI form reuse) and the one builder both call (build.py): command line > YAML > defaults,
method presets, resume rules. Only `mlxpt.errors` below it."""

from mlxpt.config.build import (
    METHODS,
    RESUME_MUTABLE,
    SECTIONS,
    AnyConfig,
    build_config,
    config_class,
    flatten,
    resolve_method,
    saved_method,
)
from mlxpt.config.prm import PRMConfig, PRMSection
from mlxpt.config.rft import RFTConfig, RFTSection
from mlxpt.config.sections import (
    ASSETS,
    DEFAULT_MODEL,
    PREF_METHODS,
    AdapterConfig,
    DataConfig,
    DPOConfig,
    GRPOConfig,
    GRPOSection,
    ModelConfig,
    PreferenceConfig,
    RegulariseConfig,
    RewardConfig,
    RMConfig,
    Sections,
    SFTConfig,
    TrainConfig,
    adapter_settings,
    all_fields,
    apply_flat,
    default_data,
    default_pref_data,
    default_prompt_data,
    ignored_adapter_settings,
    load_yaml,
    opt,
    section_fields,
    section_names,
    validate,
)

__all__ = [
    "ASSETS", "DEFAULT_MODEL", "METHODS", "PREF_METHODS", "RESUME_MUTABLE", "SECTIONS", "AdapterConfig",
    "AnyConfig", "DPOConfig", "DataConfig", "GRPOConfig", "GRPOSection", "ModelConfig", "PreferenceConfig",
    "PRMConfig", "PRMSection", "RFTConfig", "RFTSection", "RMConfig", "RegulariseConfig", "RewardConfig", "SFTConfig", "Sections", "TrainConfig", "adapter_settings", "all_fields", "apply_flat", "build_config",
    "config_class", "default_data", "default_pref_data", "default_prompt_data", "flatten", "ignored_adapter_settings", "load_yaml", "opt",
    "resolve_method", "saved_method", "section_fields", "section_names", "validate",
]  # fmt: skip
