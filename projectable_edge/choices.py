"""The host package's closed vocabularies, torch-free, so the CLI lists them in --help and refuses a typo
with the valid words before importing anything heavy. The code that acts on them reads the same enums
(config and projection are checked against them by tests/test_cli_json.py)."""

from __future__ import annotations

from projectable_edge_runtime.devices.choices import StrEnum


class Preset(StrEnum):
    TINY = "tiny"  # tests: seconds
    SMALL = "small"  # the CPU demo
    SMALL_LONG = "small-long"  # the claim table's budget: joint stage + second stage
    BASE = "base"  # GPU sizes


class ExtraOperator(StrEnum):
    ALL = "all"  # the basis maps and the mixture layer learn in the second stage
    MIXTURES = "mixtures"  # the mixture layer only
    NONE = "none"  # the projections stay as the joint stage left them (the shared delta still learns)


class Mixture(StrEnum):
    SHARED = "shared"  # one softmax over the K bases for every projection space
    PER_SPACE = "per_space"  # one per space (the default)


class Fit(StrEnum):
    EMBEDDING = "embedding"  # the operator makes the whole model from the fitted task vector
    NORMS = "norms"  # + its norm gains and biases
    ALL = "all"  # + every small weight


class Split(StrEnum):
    TEST = "test"
    VAL = "val"
    TRAIN = "train"
