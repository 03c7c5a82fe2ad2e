"""pytest setup shared by every test file.

Tests that load the real models (SmolLM2, MiniLM), train for more than a few seconds or start processes are
marked `@pytest.mark.slow`; `pytest -m "not slow" tests` runs the rest (the logic) in well under a minute.
The README's test command runs everything, notebooks included.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
