"""Stub torchaudio for the ComfyUI engine tests (see ../README.md); not the real package."""
import sys

from _unavailable import install

__version__ = "0.0.0+attnproc-test-stub"
install(sys.modules[__name__])
