"""The trial program that tests not marked `slow` get (conftest.py): a test of the fast
tier that starts a sweep without the stand-in (the `stub_trials` fixture) fails its
trials with this line instead of training models in real trial processes."""

import sys

print("error: a test not marked slow started a real trial process; mark it "
      "@pytest.mark.slow or run its trials with the stub_trials fixture", file=sys.stderr)
sys.exit(1)
