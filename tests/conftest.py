import os
import sys
from pathlib import Path

# tests/reference.py is imported by several test modules as `reference`.
sys.path.insert(0, str(Path(__file__).parent))

from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run: a CI failure reproduces on a laptop, and a
# green run is not luck of the draw. HYPOTHESIS_PROFILE=explore draws fresh ones.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
