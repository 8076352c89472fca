import sys
from pathlib import Path

# tests/reference.py is imported by several test modules as `reference`.
sys.path.insert(0, str(Path(__file__).parent))
