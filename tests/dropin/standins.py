"""Local stand-ins for the hub repositories diffusers' fast pipeline tests load.

The tests call ``from_pretrained("hf-internal-testing/tiny-random-t5")`` and the like; a directory of that name
under the working directory is read instead of the hub. The tokenizers are our in-memory ones
(``attnproc.pipelines._tokenizers``); the T5 config is the tiny one our own tiny pipelines use (32 wide, like the
hub's). Outputs therefore differ from the hub's and from the tests' hard-coded slices, which is why the drop-in
tests compare stock with attnproc rather than with those slices.
"""
from __future__ import annotations

from pathlib import Path

from attnproc.pipelines import _tokenizers as tk
from attnproc.pipelines.tiny import _t5_config

T5 = "hf-internal-testing/tiny-random-t5"
CLIP = "hf-internal-testing/tiny-random-clip"
QWEN = "hf-internal-testing/tiny-random-Qwen2VLForConditionalGeneration"
HUNYUAN = "finetrainers/dummy-hunyaunvideo"


def write_standins(root: Path) -> Path:
    """Write every stand-in under ``root`` (run the tests with ``root`` as the working directory)."""
    t5 = tk.t5_tokenizer()
    t5.save_pretrained(root / T5)
    _t5_config(t5).save_pretrained(root / T5)
    tk.clip_tokenizer().save_pretrained(root / CLIP)
    tk.qwen2_tokenizer().save_pretrained(root / QWEN)
    tk.llama_tokenizer().save_pretrained(root / HUNYUAN / "tokenizer")
    return root
