"""Resources of a compiled Triton kernel: shared memory, registers, spills (no GPU needed).

Shared memory is Triton's own figure (``metadata.shared``, bytes per program); registers, stack
frame and spills come from ``ptxas -v`` on the kernel's PTX for its architecture, run with the
ptxas Triton's own cubin build runs for that architecture (``ptxas_path``: Triton 3.9 ships a
CUDA 12.9 ``ptxas`` and a CUDA 13 ``ptxas-blackwell`` and builds sm_90 with the latter). A kernel
fits when its shared memory is within the architecture's opt-in limit per block and ptxas
reports no spill stores. ptxas reports are kept in Triton's cache directory, keyed by the PTX,
the ptxas binary and version, and the flags.
"""

from __future__ import annotations

import functools
import hashlib
import json
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


def ptxas_path(arch: int) -> str:
    """The ptxas Triton builds sm_<arch> cubins with: ``get_ptxas(arch)`` of Triton's NVIDIA
    backend where it has one (3.6 on; 3.9 picks ``ptxas-blackwell`` for arch >= 90, whose sm_90
    PTX the CUDA 12.9 ``ptxas`` rejects), else the ``ptxas`` knob."""
    from triton import knobs

    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:
        return knobs.nvidia.ptxas.path
    return get_ptxas(arch).path


@functools.cache
def _ptxas_version(path: str) -> str:
    return subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip()


def ptxas_usage(ptx: str, arch: int, *, cache: bool = True) -> dict[str, int]:
    """{"registers", "stack", "spill_stores", "spill_loads"} from ``ptxas -v`` for sm_<arch>
    (the ptxas of ``ptxas_path(arch)``); with ``cache``, a report kept from an earlier run of
    the same ptxas on the same PTX is reused."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    ptxas = ptxas_path(arch)
    flags = ["-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}"]
    manager = None
    if cache:
        from triton.runtime.cache import get_cache_manager

        key = hashlib.sha256("\0".join([ptxas, _ptxas_version(ptxas), *flags, ptx]).encode()).hexdigest()
        manager = get_cache_manager(key)
        kept = manager.get_file("ptxas-usage.json")
        if kept is not None:
            with open(kept) as f:
                return json.load(f)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas, *flags, src, "-o", os.path.join(tmp, "k.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas ({ptxas}) failed for sm_{arch}: {proc.stderr.strip()[-2000:]}")
    out = {}
    for name, pattern in _PTXAS_RE.items():
        m = pattern.search(proc.stderr)
        out[name] = int(m.group(1)) if m else 0
    if manager is not None:
        manager.put(json.dumps(out), "ptxas-usage.json", binary=False)
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


# Spill bytes a kernel may have and still pass. At its register cliffs (128 registers a thread at
# 8 warps, 168 or 80 at 4) ptxas keeps a kernel under the cliff, for one more block per SM, by
# spilling one to four registers (4-16 B of stores a thread, which stay in L1) rather than use
# more. Of the 4329 variants the full sweep compiles per Triton version, 7 (3.6) and 8 (3.8) do,
# all but one on sm_80 (docs/design.md §9); the tile changes that remove them spill elsewhere or
# cost every shape more issued instructions. Larger spills (24 B and up, the next size seen) fail.
SPILL_SLACK = 16


def problems(res: dict[str, int], arch: int) -> list[str]:
    """Why a kernel with resources ``res`` does not fit sm_<arch> (empty: it fits): shared memory
    above the per-block limit, or spill stores or loads above ``SPILL_SLACK`` bytes."""
    out = []
    limit = SHARED_LIMIT.get(arch)
    if limit is not None and res["shared"] > limit:
        out.append(f"shared memory {res['shared']} B > sm_{arch} limit {limit} B per block")
    if max(res["spill_stores"], res["spill_loads"]) > SPILL_SLACK:
        out.append(
            f"spills ({res['spill_stores']} B stores, {res['spill_loads']} B loads, "
            f"{res['stack']} B stack, {res['registers']} registers)"
        )
    return out
