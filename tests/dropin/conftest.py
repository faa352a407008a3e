"""The vendored diffusers tests under diffusers_tests/ run only inside test_same_pass_set.py's pytest subprocess
(which sets ATTNPROC_DROPIN_RUN), with the hub stand-ins as its working directory."""
import os

collect_ignore = [] if os.environ.get("ATTNPROC_DROPIN_RUN") else ["diffusers_tests"]
