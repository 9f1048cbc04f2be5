"""Where the real data is (../shared/data beside the checkout); tests that need it skip without it."""
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "splits.json").is_file(),
                                  reason=f"shared data not found at {SHARED} (real-data tests skipped)")
