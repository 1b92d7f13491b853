"""The trial program that tests not marked `slow` get (conftest.py): the fast tier starts
no trial process, so a test of it whose sweep starts one fails its trials with this
line. Such a test is slow; orchestration tests run the stand-in (`stub_trials`)."""

import sys

print("error: a test not marked slow started a trial process; mark it @pytest.mark.slow "
      "(an orchestration test runs the stand-in: the stub_trials fixture)", file=sys.stderr)
sys.exit(1)
