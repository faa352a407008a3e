"""The package as users install it: `python -m build` makes an sdist and, from it, a wheel; the wheel installs and
carries what the code loads at run time (the trained shapes models, the ComfyUI runtime), and the ComfyUI path
imports neither diffusers nor transformers (docs/comfyui.md)."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys
import attnproc
from attnproc.workflows import comfy_runtime
assert attnproc.__file__.startswith(sys.argv[1]), attnproc.__file__  # the installed wheel, not the checkout
heavy = sorted(m for m in ("diffusers", "transformers") if m in sys.modules)
assert not heavy, f"the ComfyUI path imported {heavy}"
from attnproc.pipelines.shapes_models import shapes_model_dir
for kind in ("sd15", "wan21", "flux"):
    folder = shapes_model_dir(kind)
    assert str(folder).startswith(sys.argv[1]) and (folder / "model_index.json").exists(), folder
print("ok")
"""


def test_build_sdist_and_wheel_then_install(tmp_path):
    dist = tmp_path / "dist"
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    sdists, wheels = list(dist.glob("attnproc-*.tar.gz")), list(dist.glob("attnproc-*-py3-none-any.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in dist.iterdir())
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "attnproc/workflows/comfy_runtime.py" in names
    assert any(n.startswith("attnproc/pipelines/shapes_models/wan21/") and n.endswith(".safetensors")
               for n in names)
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                           str(wheels[0])], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-c", CHECK, str(site)], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site),
                                             "HOME": str(tmp_path)})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout[-2000:] + proc.stderr[-2000:]
