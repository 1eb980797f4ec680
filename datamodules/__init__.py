"""DataModules: data sources, albumentations perturbation pools, the synthetic perception task, evaluation
benchmarks, collation."""

import os

# albumentations asks PyPI for a newer version on import unless told not to: an offline cluster node waits
# for the time-out, and nothing here needs the answer. A value the user set is kept.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


from datamodules.benchmarks import Benchmark, BenchmarkDataModule
from datamodules.examples import DEFAULT_PROMPT_TEMPLATE, ImageLimits, PromptEncoder, SkipReport
from datamodules.perturbations import PerturbationPool, ViewMaker
from datamodules.sources import Columns, DataSource
from datamodules.synthetic import SyntheticTaskConfig, export_synthetic_dataset, generate_split
from datamodules.vqa import SyntheticVQADataModule, VisualQADataModule, VQADataset

__all__ = [
    "DEFAULT_PROMPT_TEMPLATE",
    "Benchmark",
    "BenchmarkDataModule",
    "Columns",
    "DataSource",
    "ImageLimits",
    "PerturbationPool",
    "PromptEncoder",
    "SkipReport",
    "SyntheticTaskConfig",
    "SyntheticVQADataModule",
    "VQADataset",
    "ViewMaker",
    "VisualQADataModule",
    "export_synthetic_dataset",
    "generate_split",
]
