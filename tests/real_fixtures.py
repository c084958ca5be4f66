"""Real annotation excerpts in shared/fixtures/real (beside the checkout, as CI lays it out)."""

from __future__ import annotations

from pathlib import Path

import pytest

REAL_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "real"


def needs_real(dataset: str) -> pytest.MarkDecorator:
    """Skip, saying why, when the real excerpts of `dataset` are not beside this checkout."""
    folder = REAL_FIXTURES / dataset
    return pytest.mark.skipif(not folder.is_dir(), reason=f"real {dataset} excerpts not found at {folder}")
