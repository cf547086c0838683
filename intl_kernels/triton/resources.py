"""Resources of a compiled Triton kernel: shared memory, registers, spills (no GPU needed).

Shared memory is Triton's own figure (``metadata.shared``, bytes per program); registers, stack
frame and spills come from ``ptxas -v`` (the ptxas that ships with Triton) on the kernel's PTX
for its architecture, what Triton's own cubin build runs. A kernel fits when its shared memory
is within the architecture's opt-in limit per block and ptxas reports no spill stores.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

# Largest dynamic shared memory one block may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}
_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def ptxas_usage(ptx: str, arch: int) -> dict[str, int]:
    """{"registers", "stack", "spill_stores", "spill_loads"} from ``ptxas -v`` for sm_<arch>."""
    from triton import knobs
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [
            knobs.nvidia.ptxas.path,
            "-v",
            "--regAllocOptLevel=2",
            f"--gpu-name={sm_arch_from_capability(arch)}",
        ]
        proc = subprocess.run([*cmd, src, "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for sm_{arch}: {proc.stderr.strip()[-2000:]}")
    out = {}
    for name, pattern in _PTXAS_RE.items():
        m = pattern.search(proc.stderr)
        out[name] = int(m.group(1)) if m else 0
    return out


def resources(compiled, arch: int) -> dict[str, int]:
    """{"shared", "num_warps", "registers", "stack", "spill_stores", "spill_loads"} of a
    ``triton.compile`` result for sm_<arch>."""
    meta = compiled.metadata
    return {
        "shared": int(meta.shared),
        "num_warps": int(meta.num_warps),
        **ptxas_usage(compiled.asm["ptx"], arch),
    }


def problems(res: dict[str, int], arch: int) -> list[str]:
    """Why a kernel with resources ``res`` does not fit sm_<arch> (empty: it fits)."""
    out = []
    limit = SHARED_LIMIT.get(arch)
    if limit is not None and res["shared"] > limit:
        out.append(f"shared memory {res['shared']} B > sm_{arch} limit {limit} B per block")
    if res["spill_stores"] or res["spill_loads"]:
        out.append(
            f"spills ({res['spill_stores']} B stores, {res['spill_loads']} B loads, "
            f"{res['stack']} B stack, {res['registers']} registers)"
        )
    return out
