"""Under real diffusers context parallelism (torchrun, 2 CPU ranks, gloo) attnproc refuses clearly."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_context_parallelism_is_refused_in_both_orders():
    script = Path(__file__).parent / "scripts" / "cp_refusal.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    results = json.loads(line[len("RESULT "):])
    assert "context parallelism" in results["apply_after_cp"]
    assert "do not support diffusers context parallelism" in results["forward_cp_after_apply"]
