"""Fixtures of the data-package tests: a tiny synthetic Cityscapes generated once per session.

Test modules import the fixtures they use (``from data_fixtures import synthetic_cityscapes``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hms_segmentation.data.synthesize import SyntheticDatasetOptions, synthesize_cityscapes

SYNTHETIC_HEIGHT, SYNTHETIC_WIDTH = 64, 128
SYNTHETIC_TRAIN, SYNTHETIC_VAL = 12, 4


@pytest.fixture(scope="session")
def synthetic_cityscapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a 12 train + 4 val frame synthetic Cityscapes at 64x128 (read-only: copy it before changing files)."""
    return synthesize_cityscapes(SyntheticDatasetOptions(
        output_dir=tmp_path_factory.mktemp("synthetic_cityscapes"), num_train=SYNTHETIC_TRAIN, num_val=SYNTHETIC_VAL,
        height=SYNTHETIC_HEIGHT, width=SYNTHETIC_WIDTH, seed=0, num_workers=1))


@pytest.fixture
def hf_cache(tmp_path: Path) -> Path:
    """A private `datasets` cache, so tests never reuse (or pollute) the user's cache."""
    return tmp_path / "hf_cache"
