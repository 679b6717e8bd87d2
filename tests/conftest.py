import os
import sys

from hypothesis import Phase, settings

sys.path.insert(0, os.path.dirname(__file__))   # tests/problems.py: shared problem builders

# CI (CI=true) draws the same hypothesis examples on every run, so that a landing does not hang on
# which random examples a run happens to draw; local runs draw fresh ones and keep exploring (the
# float32 criterion of test_kernels.py fails about once in several thousand examples, on tiny
# problems whose float32 errors are all rounding luck: see _float32_check).
settings.register_profile("ci", derandomize=True)
# validation/gpu_check.sh (a lent GPU, a few minutes): report a failing example at once, unshrunk
# (shrinking a GPU failure can take longer than the whole check may run).
settings.register_profile("gpu-check", phases=[Phase.explicit, Phase.reuse, Phase.generate],
                          print_blob=True)
if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    settings.load_profile("ci")
