"""Shared fixtures: small synthetic data sets written once per test session.

``dataset_factory(**synthesize_kwargs) -> Path`` writes (and caches per argument set)
a data set under a session temp folder; ``small_dataset`` is a ready-made one:
types 1, 3, 20 (0, 2 and 1 obstacle windows), 8 videos x 1500 frames per type,
half of them anomalous with every kind in `ANOMALY_KINDS` represented (labels.csv
tells which). Treat both as read-only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.processes import ProcessGroup

SMALL_TYPES = (1, 3, 20)


@pytest.fixture(scope="session")
def dataset_factory(tmp_path_factory):
    from lhtstream.io.simulate import synthesize

    cache: dict[tuple, Path] = {}

    def make(**kwargs) -> Path:
        key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))
        if key not in cache:
            root = tmp_path_factory.mktemp("synth")
            synthesize(root, **kwargs)
            cache[key] = root
        return cache[key]

    return make


@pytest.fixture(scope="session")
def small_dataset(dataset_factory) -> Path:
    return dataset_factory(
        types=list(SMALL_TYPES), videos_per_type=8, frames=1500, anomaly_rate=0.5, seed=7
    )


@pytest.fixture(scope="session")
def tiny_dataset(dataset_factory) -> Path:
    """One type (Type3, two obstacle windows), 2 normal videos x 300 frames."""
    return dataset_factory(types=[3], videos_per_type=2, frames=300, seed=1)


@pytest.fixture
def procs():
    """A ProcessGroup: every CLI process a test starts is gone when it ends."""
    with ProcessGroup() as group:
        yield group
