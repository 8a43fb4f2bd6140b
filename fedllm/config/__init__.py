"""The experiment config: sections (:mod:`.sections`), cross-section rules (:mod:`.rules`),
``key=value`` overrides (:mod:`.overrides`) and file loading (:mod:`.files`)."""

from fedllm.config.experiment import ExperimentConfig
from fedllm.config.files import (
    config_from_dict,
    config_from_json,
    load_config,
    read_experiment_yaml,
    save_yaml,
    unpinned_sweep,
)
from fedllm.config.overrides import dotted_leaves, parse_overrides
from fedllm.config.sections import (
                                    ChannelSection,
                                    ClientSection,
                                    DataSection,
                                    EvalSection,
                                    ModelSection,
                                    NamedSection,
                                    OutputSection,
                                    PeftSection,
                                    RLSection,
                                    StrategySection,
                                    TaskSpec,
)
from fedllm.core.errors import ConfigError

__all__ = ["ChannelSection", "ClientSection", "ConfigError", "DataSection", "EvalSection", "ExperimentConfig",
           "ModelSection", "NamedSection", "OutputSection", "PeftSection", "RLSection", "StrategySection", "TaskSpec",
           "config_from_dict", "config_from_json", "dotted_leaves", "load_config", "parse_overrides",
           "read_experiment_yaml", "save_yaml", "unpinned_sweep"]
