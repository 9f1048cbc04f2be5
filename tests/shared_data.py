"""Where the real data is (`sbir_core.data.datasets.data_root`: $SBIR_DATA, else ../shared/data
beside the checkout); tests that need it skip without it."""
from pathlib import Path

import pytest

from sbir_core.errors import InputError
from sbir_core.data.datasets import data_root

try:
    SHARED: Path = data_root()
    _MISSING = ""
except InputError as exc:
    SHARED = Path("shared-data-not-found")  # no such folder: the tests that need one skip
    _MISSING = str(exc)
needs_shared = pytest.mark.skipif(bool(_MISSING), reason=f"real-data tests skipped: {_MISSING}")
