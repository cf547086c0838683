"""What the streaming kernels of both GPU backends issue, read from their SASS (no GPU needed).

    python -m verify.sass_report [--backend cuda|triton|both] [--so PATH] [--tag after] [--arch sm_90]
                                [--out-dir bench/results]

For every streaming kernel of the built extension (``stats``, ``dstats``, ``apply`` forward and
backward; float32, bfloat16 and float16; row buckets 32, 64 and 128) it reads, from the sm_90
cubins in ``intl_kernels/_C*.so`` (``cuobjdump -res-usage`` and ``-sass``): registers, spill
bytes, shared memory (static as compiled plus dynamic as launched), the blocks per SM these
allow, the instructions of the main loop per element and the FFMA/HMMA/HGMMA counts, and
predicts the IterNorm layer's time at the ResNet-50 stage shapes against BatchNorm's memory
floor. Writes ``bench/results/sass-report-cuda-<tag>.json`` and ``.md`` and prints the tables;
then the triton backend's streaming kernels, compiled here for sm_90 as the layer launches
them, into ``sass-report-triton-<tag>.*`` (``verify.sass_triton``, the same model).

How the main loop is counted (``main_loop``, ``hot_path``): the main loop is the innermost loop
(a backward branch) that holds a block barrier: the loop over column tiles. One iteration is
counted along the path a warp takes through a full tile: forward conditional branches fall
through (the guarded code runs: every row and column of a full tile is valid), except an
if/else arm that calls a subroutine (the slow path of a 64-bit division, taken only for
operands of 32 bits or more), which is jumped over; an inner loop counts its body times its
trip count (``trips``; the kernels after the change have none: every loop in a tile is
unrolled). Divided by the elements one iteration handles per warp (rows × tile columns /
warps), that is the kernel's issued warp-instructions per element of z.

The model (``MODEL``, ``predict``): H100 SXM, 132 SMs, 4 schedulers per SM each issuing one
warp-instruction per cycle at 1.755 GHz, HBM at 3.35 TB/s. A kernel takes max(issue time =
warp-instructions per element × elements / (132·4·1.755e9), memory time = compulsory bytes /
3.35e12); the layer's forward is stats + apply, its backward dstats + apply, plus the small
launches (merge, Newton or adjoint: 5 µs each). Compulsory bytes: stats reads z; apply
forward reads z, writes y; dstats reads z and dy; apply backward reads z and dy, writes dz.
BatchNorm's floor: forward 3 passes (read x for the statistics, read x and write y to
normalise), backward 5 passes (read x and dy for the reductions, read x and dy again and
write dx), each N·C·H·W elements of the dtype, at 3.35 TB/s, and nothing else.

Pieces meant for reuse by other sources of kernels (e.g. Triton cubins): ``sass_of``,
``resources_of``, ``parse``, ``main_loop``, ``hot_path``, ``op_counts``, ``blocks_per_sm``,
``predict``; a kernel's report is a plain dict (``KERNEL_KEYS``), the layer summary separate.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.goals import RESNET50_STAGES

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"  # committed beside the benchmarks' results

# Per-SM limits used for the blocks per SM (CUDA occupancy rules: registers allocated per warp
# in units of 256, shared memory per block in units of 128 bytes).
ARCH_LIMITS = {
    "sm_90": {"regs": 65536, "reg_unit": 256, "smem": 228 * 1024, "threads": 2048, "blocks": 32},
    "sm_80": {"regs": 65536, "reg_unit": 256, "smem": 164 * 1024, "threads": 2048, "blocks": 32},
}
# The machine of the prediction.
MODEL = {
    "device": "H100 SXM",
    "sms": 132,
    "schedulers_per_sm": 4,
    "clock_hz": 1.755e9,
    "hbm_bytes_per_s": 3.35e12,
    "small_launch_s": 5e-6,
}
KERNEL_KEYS = (
    "backend", "kernel", "dtype", "direction", "rows", "registers", "spill_bytes", "shared_bytes", "threads",
    "blocks_per_sm", "loop_instructions", "elements_per_iteration", "warp_instructions_per_element", "ffma",
    "hmma", "hgmma",
)  # fmt: skip
DTYPES = {"float": "fp32", "c10::BFloat16": "bf16", "c10::Half": "fp16"}
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


# ---------------------------------------------------------------------------------------------
# Tools and raw SASS


def find_tool(name: str) -> str:
    """`name` (cuobjdump, nvdisasm) from PATH, CUDA_HOME/bin or the copy that Triton ships."""
    found = shutil.which(name)
    if found:
        return found
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", name))
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))
    except ImportError:
        pass
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise FileNotFoundError(f"{name} not found on PATH, in CUDA_HOME/bin or in triton's backends/nvidia/bin")


def _run(args: list[str]) -> str:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> demangled names (c++filt); names unchanged where it is missing."""
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    done = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=False)
    out = done.stdout.splitlines()
    return dict(zip(names, out, strict=True)) if len(out) == len(names) else {n: n for n in names}


def _arch_args(path: str, arch: str) -> list[str]:
    return [] if path.endswith(".cubin") else ["-arch", arch]


def sass_of(path: str | os.PathLike, arch: str = "sm_90") -> dict[str, str]:
    """{demangled kernel name: SASS text} of a cubin or of the `arch` cubins in a shared object."""
    path = str(path)
    text = _run([find_tool("cuobjdump"), "-sass", *_arch_args(path, arch), path])
    parts: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = m.group(1)
            parts[current] = []
        elif current is not None:
            parts[current].append(line)
    names = demangle(list(parts))
    return {names[k]: "\n".join(v) for k, v in parts.items()}


def resources_of(path: str | os.PathLike, arch: str = "sm_90") -> dict[str, dict[str, int]]:
    """{demangled kernel name: {registers, stack, shared_static, local}} from cuobjdump -res-usage
    (on sm_90 the static shared memory includes the 1 KiB the system reserves per block)."""
    path = str(path)
    text = _run([find_tool("cuobjdump"), "-res-usage", *_arch_args(path, arch), path])
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+?):?\s*$", line)
        if m:
            current = m.group(1)
            continue
        if current is not None and "REG:" in line:
            f = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            out[current] = {
                "registers": int(f["REG"]),
                "stack": int(f.get("STACK", 0)),
                "shared_static": int(f.get("SHARED", 0)),
                "local": int(f.get("LOCAL", 0)),
            }
            current = None
    names = demangle(list(out))
    return {names[k]: v for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# SASS analysis


@dataclass(frozen=True)
class Instr:
    addr: int
    pred: str  # "" or the guard, e.g. "@!P0"
    op: str  # full opcode with modifiers, e.g. "LDS.128"
    args: str

    @property
    def base(self) -> str:
        return self.op.split(".")[0]

    def target(self) -> int | None:
        """Branch target of a direct BRA, else None."""
        if self.base != "BRA":
            return None
        m = re.findall(r"0x[0-9a-f]+", self.args)
        return int(m[-1], 16) if m else None


def parse(sass_text: str) -> list[Instr]:
    out = []
    for line in sass_text.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if not m:
            continue
        text = m.group(2).strip()
        pred = ""
        pm = re.match(r"(@!?U?P[T0-9]+)\s+(.*)", text)
        if pm:
            pred, text = pm.group(1), pm.group(2)
        op, _, args = text.partition(" ")
        out.append(Instr(int(m.group(1), 16), pred, op, args.strip()))
    return out


def loops(instrs: list[Instr]) -> list[tuple[int, int]]:
    """(head, back-edge address) of every backward branch."""
    return [(t, i.addr) for i in instrs if (t := i.target()) is not None and t <= i.addr]


def _within(instrs: list[Instr], start: int, end: int) -> list[Instr]:
    return [i for i in instrs if start <= i.addr <= end]


def main_loop(sass_text: str | list[Instr]) -> tuple[int, int, list[Instr]]:
    """(start, end, instructions) of the innermost loop holding a barrier (the tile loop); the
    largest if there are several."""
    instrs = parse(sass_text) if isinstance(sass_text, str) else sass_text
    with_bar = [(s, e) for s, e in loops(instrs) if any(i.base == "BAR" for i in _within(instrs, s, e))]
    if not with_bar:
        raise ValueError("no loop with a barrier")
    innermost = [
        (s, e)
        for s, e in with_bar
        if not any((s2, e2) != (s, e) and s <= s2 and e2 <= e for s2, e2 in with_bar)
    ]
    s, e = max(innermost, key=lambda se: len(_within(instrs, *se)))
    return s, e, _within(instrs, s, e)


def op_counts(instructions: list[Instr]) -> dict[str, int]:
    """Instructions per base opcode (FFMA, HMMA, HGMMA, LDS, LDG, IMAD, ...), always with the
    first four keys."""
    c = Counter(i.base for i in instructions)
    for k in ("FFMA", "HMMA", "HGMMA", "LDS", "LDG", "IMAD"):
        c.setdefault(k, 0)
    return dict(c)


def spill_bytes(instructions: list[Instr]) -> int:
    """Bytes stored to local memory by STL instructions (ptxas' 'spill stores')."""
    total = 0
    for i in instructions:
        if i.base == "STL":
            m = re.search(r"\.(\d+)", i.op)
            total += int(m.group(1)) // 8 if m and int(m.group(1)) >= 32 else 4
    return total


def _cold_arm(instrs: list[Instr], k: int, target: int) -> bool:
    """The code a forward branch at instrs[k] skips is an if/else arm that calls a subroutine and
    does nothing else: no branch but the jump to the join at its end (the slow path of a 64-bit
    division: move the operands, call, move the result, jump)."""
    arm = []
    for i in instrs[k + 1 :]:
        if i.addr >= target:
            break
        arm.append(i)
    return (
        bool(arm)
        and arm[-1].base == "BRA"
        and not arm[-1].pred
        and any(i.base == "CALL" for i in arm)
        and not any(i.base in ("BRA", "BRX", "JMP", "EXIT", "BAR") for i in arm[:-1])
    )


def hot_path(
    instrs: list[Instr], start: int, end: int, trips: Callable[[list[Instr]], float] | None = None
) -> tuple[dict[str, float], list[str]]:
    """Instructions per base opcode that a warp issues in one iteration of the loop [start, end]
    (the path: see the module docstring), and notes on what was assumed. `trips(body)` gives an
    inner loop's trip count; without it inner loops count once and a note says so."""
    index = {i.addr: k for k, i in enumerate(instrs)}
    heads: dict[int, int] = {}
    for s, e in loops(instrs):
        if start <= s and e <= end and (s, e) != (start, end):
            heads[s] = max(heads.get(s, e), e)
    notes: list[str] = []

    def walk(lo: int, hi: int) -> Counter:
        total: Counter = Counter()
        k = index[lo]
        while k < len(instrs) and instrs[k].addr <= hi:
            ins = instrs[k]
            if ins.addr != lo and ins.addr in heads and heads[ins.addr] <= hi:
                back = heads[ins.addr]
                n = trips(_within(instrs, ins.addr, back)) if trips is not None else 1.0
                if trips is None:
                    notes.append(f"inner loop {ins.addr:#x}-{back:#x} counted once")
                for op, v in walk(ins.addr, back).items():
                    total[op] += n * v
                k = index[back] + 1
                continue
            total[ins.base] += 1
            if ins.addr == hi:
                break
            t = ins.target()
            if t is not None:
                if not ins.pred or ins.pred == "@PT":
                    if t > ins.addr:
                        k = index[t]
                        continue
                    break
                if t > ins.addr and _cold_arm(instrs, k, t):
                    k = index[t]
                    continue
            if ins.base in ("EXIT", "RET") and not ins.pred:
                break
            k += 1
        return total

    return dict(walk(start, end)), sorted(set(notes))


# ---------------------------------------------------------------------------------------------
# Occupancy and the time model


def blocks_per_sm(registers: int, shared_bytes: int, threads: int, arch: str = "sm_90") -> int:
    """Resident blocks per SM allowed by registers, shared memory (per block, as launched) and
    threads, capped by the architecture's blocks per SM."""
    lim = ARCH_LIMITS[arch]
    warps = math.ceil(threads / 32)
    by_threads = lim["threads"] // (warps * 32)
    per_warp = math.ceil(max(registers, 1) * 32 / lim["reg_unit"]) * lim["reg_unit"]
    by_regs = (lim["regs"] // per_warp) // warps
    smem = math.ceil(shared_bytes / 128) * 128
    by_smem = lim["smem"] // smem if smem else lim["blocks"]
    return max(0, min(by_threads, by_regs, by_smem, lim["blocks"]))


def predict(
    warp_instructions_per_element: float, elements: int, compulsory_bytes: float, model=MODEL
) -> dict:
    """A kernel's time: max(issue time, memory time) in seconds, and which one bounds it."""
    rate = model["sms"] * model["schedulers_per_sm"] * model["clock_hz"]
    issue = warp_instructions_per_element * elements / rate
    memory = compulsory_bytes / model["hbm_bytes_per_s"]
    return {
        "issue_s": issue,
        "memory_s": memory,
        "time_s": max(issue, memory),
        "bound": "issue" if issue >= memory else "memory",
    }


# ---------------------------------------------------------------------------------------------
# The cuda backend's streaming kernels

# Passes over N·C·H·W elements each streaming kernel must make (reads + writes).
PASSES = {("stats", "fwd"): 1, ("apply", "fwd"): 2, ("dstats", "bwd"): 2, ("apply", "bwd"): 3}
BATCHNORM_PASSES = {"fwd": 3, "bwd": 5}


def legacy_geometry(kernel: str, bwd: bool, rows: int) -> dict:
    """Tile geometry of the kernels before the per-tile indexing change (csrc at commit 3ccc53f),
    which the extension did not export: columns per tile, dynamic shared memory, and the work
    per thread and tile that gives the trip counts of their inner loops."""
    cb = rows
    if kernel == "stats":
        tn, dyn, tensors = 64, 0, 1
        ffma = (cb // 16) ** 2 * tn
    elif kernel == "dstats":
        tn, dyn, tensors = (32 if cb == 128 else 64), 0, 2
        ffma = (cb // 16) ** 2 * tn
    else:
        kw = 2 * cb if bwd else cb
        tn = (16 if bwd else 32) if cb == 128 else 64
        dyn = 4 * (cb * (kw + 1) + kw * (tn + 1) + 4 * cb)
        tensors = 2 if bwd else 1
        ffma = (cb // 16) * (tn // 16) * kw
    per_thread = cb * tn // 256
    return {
        "columns": tn,
        "threads": 256,
        "dynamic_smem": dyn,
        "ffma_per_thread": ffma,
        "ldg_per_thread": per_thread * tensors,
        "stg_per_thread": per_thread if kernel == "apply" else 0,
        "row_warps": max(1, cb // 32),
    }


def legacy_trips(geom: dict) -> Callable[[list[Instr]], float]:
    """Trip counts of the inner loops of the old kernels' tile loop, from the work they do per
    tile: a product loop (FFMA) runs FFMA-per-thread / FFMA-in-body times, a load loop
    (LDG) or store loop (STG) likewise; a loop over a row's columns (LDS only, run by the
    threads t < c) runs columns / LDS-in-body times, its remainder loops (a smaller unroll
    right after it) the remaining columns, weighted by the share of warps that hold row threads."""
    state = {"chain_end": -1, "left": 0, "unroll": 0}

    def trips(body: list[Instr]) -> float:
        ops = op_counts(body)
        if ops["FFMA"] >= 8 and ops["FFMA"] >= 2 * ops["LDS"] and geom["ffma_per_thread"]:
            return geom["ffma_per_thread"] / ops["FFMA"]
        if ops["LDG"]:
            return geom["ldg_per_thread"] / ops["LDG"]
        if ops.get("STG"):
            return geom["stg_per_thread"] / ops["STG"]
        unroll = max(ops["LDS"], 1)
        start = body[0].addr
        if not (0 <= start - state["chain_end"] <= 48 * 16 and unroll < state["unroll"]):
            state["left"] = geom["columns"]
        n = state["left"] // unroll
        state.update(chain_end=body[-1].addr, left=state["left"] - n * unroll, unroll=unroll)
        return n * geom["row_warps"] / (geom["threads"] // 32)

    return trips


def _kernel_id(name: str) -> tuple[str, str, int, bool] | None:
    """(kernel, dtype, rows, bwd) of a streaming kernel's demangled name, else None."""
    m = re.search(r"(stats|dstats|apply)_kernel<([^,<>]+), (\d+)(?:, (true|false))?", name)
    if not m or m.group(2) not in DTYPES:
        return None
    kernel = m.group(1)
    bwd = kernel == "dstats" or m.group(4) == "true"
    return kernel, DTYPES[m.group(2)], int(m.group(3)), bwd


_SHAPES_SCRIPT = """
import importlib.util, json, sys
import torch  # noqa: F401  (the extension links against it)
spec = importlib.util.spec_from_file_location("_C", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(json.dumps(module.small_kernel_shapes() if hasattr(module, "small_kernel_shapes") else None))
"""


def extension_geometry(path: str | None = None) -> dict | None:
    """{(kernel, bwd, rows): geometry} that the extension at `path` (default: the importable
    intl_kernels._C; a cubin: that one's) exports, None when it exports none (built before
    small_kernel_shapes existed). Read in a subprocess: the file may not be the one imported here."""
    import sys

    if path is None or str(path).endswith(".cubin"):
        try:
            from intl_kernels import _C
        except ImportError:
            return None
        path = _C.__file__
    done = subprocess.run([sys.executable, "-c", _SHAPES_SCRIPT, str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"reading the kernel shapes of {path} failed: {done.stderr.strip()[-2000:]}")
    shapes = json.loads(done.stdout.strip().splitlines()[-1])
    if shapes is None:
        return None
    return {(g["kernel"], bool(g["bwd"]), int(g["rows"])): dict(g) for g in shapes}


def default_so() -> str:
    found = sorted(glob.glob(str(ROOT / "intl_kernels" / "_C*.so")))
    if not found:
        raise FileNotFoundError("no intl_kernels/_C*.so: build the extension first")
    return found[0]


def cuda_kernels(so_path: str | list[str], arch: str = "sm_90", geometry: dict | None = None) -> list[dict]:
    """One report dict per streaming kernel of the cuda backend in `so_path` (a shared object or
    cubin, or a list of them)."""
    paths = [so_path] if isinstance(so_path, (str, os.PathLike)) else list(so_path)
    sass: dict[str, str] = {}
    res: dict[str, dict] = {}
    for p in paths:
        sass.update(sass_of(p, arch))
        res.update(resources_of(p, arch))
    rows_out = []
    for name, text in sass.items():
        kid = _kernel_id(name)
        if kid is None:
            continue
        kernel, dtype, rows, bwd = kid
        geom = (geometry or {}).get((kernel, bwd, rows)) or legacy_geometry(kernel, bwd, rows)
        instrs = parse(text)
        start, end, body = main_loop(instrs)
        trips = legacy_trips(geom) if "ffma_per_thread" in geom else None
        path, notes = hot_path(instrs, start, end, trips)
        count = sum(path.values())
        inner = [(s, e) for s, e in loops(instrs) if start <= s and e <= end and (s, e) != (start, end)]
        if inner and trips is not None:
            notes.append(
                f"{len(inner)} inner loops weighted by trip counts from the tile geometry (legacy_trips)"
            )
        r = res[name]
        threads = int(geom["threads"])
        shared = r["shared_static"] + int(geom["dynamic_smem"])
        per_warp = rows * int(geom["columns"]) // (threads // 32)
        whole = op_counts(instrs)
        rows_out.append(
            {
                "backend": "cuda",
                "kernel": kernel,
                "dtype": dtype,
                "direction": "bwd" if bwd else "fwd",
                "rows": rows,
                "registers": r["registers"],
                "spill_bytes": spill_bytes(instrs),
                "stack_bytes": r["stack"],
                "shared_static": r["shared_static"],
                "shared_dynamic": int(geom["dynamic_smem"]),
                "shared_bytes": shared,
                "threads": threads,
                "blocks_per_sm": blocks_per_sm(r["registers"], shared, threads, arch),
                "loop": [hex(start), hex(end)],
                "loop_instructions": round(count, 1),
                "loop_static_instructions": len(body),
                "loop_per_element": {
                    op: round(v / per_warp, 3) for op, v in sorted(path.items(), key=lambda kv: -kv[1])[:14]
                },
                "inner_loops": len(inner),
                "tile_columns": int(geom["columns"]),
                "elements_per_iteration": per_warp,
                "warp_instructions_per_element": round(count / per_warp, 3),
                "ffma": whole["FFMA"],
                "hmma": whole["HMMA"],
                "hgmma": whole["HGMMA"],
                "notes": notes,
                "name": name,
            }
        )
    order = {("stats", "fwd"): 0, ("apply", "fwd"): 1, ("dstats", "bwd"): 2, ("apply", "bwd"): 3}
    rows_out.sort(key=lambda d: (order[(d["kernel"], d["direction"])], d["rows"], d["dtype"]))
    return rows_out


def layer_summary(kernels: list[dict], rows: int = 64, model=MODEL) -> list[dict]:
    """Predicted forward and backward of the IterNorm layer (64 channels per group, T = 5) at the
    ResNet-50 stages, against BatchNorm's memory floor, for float32 and bfloat16."""
    out = []
    by = {(k["kernel"], k["direction"], k["dtype"]): k for k in kernels if k["rows"] == rows}
    for dtype in ("fp32", "bf16"):
        if not all((k, d, dtype) in by for k, d in PASSES):
            continue
        b = BYTES[dtype]
        for n, c, h, w in RESNET50_STAGES:
            elements = n * c * h * w
            row = {"shape": [n, c, h, w], "dtype": dtype, "groups": c // rows, "elements": elements}
            for direction, kernels_of in (("fwd", ("stats", "apply")), ("bwd", ("dstats", "apply"))):
                total = 2 * model["small_launch_s"]
                for k in kernels_of:
                    p = predict(
                        by[(k, direction, dtype)]["warp_instructions_per_element"],
                        elements,
                        PASSES[(k, direction)] * elements * b,
                        model,
                    )
                    row[f"{direction}_{k}_ms"] = round(p["time_s"] * 1e3, 4)
                    row[f"{direction}_{k}_bound"] = p["bound"]
                    total += p["time_s"]
                against_floor(row, direction, total, elements * b, model)
            out.append(with_total(row))
    return out


def against_floor(row: dict, direction: str, seconds: float, tensor_bytes: int, model=MODEL) -> None:
    """Puts a direction's predicted time, BatchNorm's memory floor for it (its passes over a
    tensor of ``tensor_bytes``) and their ratio into a layer row."""
    floor = BATCHNORM_PASSES[direction] * tensor_bytes / model["hbm_bytes_per_s"]
    row[f"{direction}_ms"] = round(seconds * 1e3, 4)
    row[f"{direction}_batchnorm_floor_ms"] = round(floor * 1e3, 4)
    row[f"{direction}_vs_floor"] = round(seconds / floor, 2)


def with_total(row: dict) -> dict:
    """The layer row with forward + backward against the floor of both."""
    row["total_ms"] = round(row["fwd_ms"] + row["bwd_ms"], 4)
    row["total_batchnorm_floor_ms"] = round(row["fwd_batchnorm_floor_ms"] + row["bwd_batchnorm_floor_ms"], 4)
    row["total_vs_floor"] = round(row["total_ms"] / row["total_batchnorm_floor_ms"], 2)
    return row


def per_element_totals(kernels: list[dict], rows: int = 64) -> dict:
    """Forward (stats + apply) and backward (dstats + apply) warp-instructions per element, and
    the FFMA among them."""
    out = {}
    for dtype in sorted({k["dtype"] for k in kernels}):
        by = {(k["kernel"], k["direction"]): k for k in kernels if k["rows"] == rows and k["dtype"] == dtype}
        if len(by) != 4:
            continue
        row = {}
        for direction, pair in (("fwd", ("stats", "apply")), ("bwd", ("dstats", "apply"))):
            ks = [by[(pair[0], direction)], by[(pair[1], direction)]]
            row[direction] = round(sum(k["warp_instructions_per_element"] for k in ks), 2)
            row[f"{direction}_ffma"] = round(sum(k["loop_per_element"].get("FFMA", 0.0) for k in ks), 2)
        out[dtype] = row
    return out


# ---------------------------------------------------------------------------------------------
# Output


def _md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


KERNEL_COLUMNS = [
    ("kernel", "kernel"), ("direction", "dir"), ("dtype", "dtype"), ("rows", "rows"), ("registers", "regs"),
    ("spill_bytes", "spill B"), ("shared_bytes", "smem B"), ("blocks_per_sm", "blocks/SM"),
    ("tile_columns", "tile cols"), ("loop_instructions", "loop instr"),
    ("elements_per_iteration", "elem/warp"), ("warp_instructions_per_element", "instr/elem"),
    ("ffma", "FFMA"), ("hmma", "HMMA"), ("hgmma", "HGMMA"),
]  # fmt: skip
LAYER_COLUMNS = [
    ("shape", "N,C,H,W"), ("dtype", "dtype"), ("fwd_ms", "fwd ms"),
    ("fwd_batchnorm_floor_ms", "BN fwd floor"),
    ("fwd_vs_floor", "fwd/floor"), ("bwd_ms", "bwd ms"), ("bwd_batchnorm_floor_ms", "BN bwd floor"),
    ("bwd_vs_floor", "bwd/floor"), ("total_vs_floor", "total/floor"), ("fwd_stats_bound", "stats"),
    ("fwd_apply_bound", "apply"), ("bwd_dstats_bound", "dstats"), ("bwd_apply_bound", "apply bwd"),
]  # fmt: skip


def _cell(v):
    return "x".join(map(str, v)) if isinstance(v, list) else v


def render_markdown(report: dict) -> str:
    m = report["model"]
    parts = [
        f"# SASS report of the cuda backend ({report['tag']})",
        "",
        f"Source: `{report['source']}` ({report['arch']}). Generated by `python -m verify.sass_report`.",
        "",
        "Main loop: the innermost loop with a block barrier (the tile loop), counted along a full "
        "tile's path (guarded code runs, the subroutine arms of 64-bit divisions are skipped, inner "
        "loops times their trip counts). instr/elem = loop instructions / (rows × tile columns / warps).",
        "",
        _md_table(
            [h for _, h in KERNEL_COLUMNS],
            [[_cell(k[c]) for c, _ in KERNEL_COLUMNS] for k in report["kernels"]],
        ),
        "",
        "## Per element at c = 64 (row bucket 64)",
        "",
        _md_table(
            [
                "dtype",
                "forward (stats + apply)",
                "of which FFMA",
                "backward (dstats + apply)",
                "of which FFMA",
            ],
            [[d, v["fwd"], v["fwd_ffma"], v["bwd"], v["bwd_ffma"]] for d, v in report["per_element"].items()],
        ),
        "",
        "## Predicted IterNorm layer (64 channels per group) at the ResNet-50 stages, N = 256 "
        "(a prediction, not a measurement)",
        "",
        f"Model: {m['device']}, {m['sms']} SMs × {m['schedulers_per_sm']} schedulers at "
        f"{m['clock_hz'] / 1e9:.3f} GHz, HBM {m['hbm_bytes_per_s'] / 1e12:.2f} TB/s; kernel time = "
        "max(issue, compulsory bytes / HBM); forward = stats + apply + 2 small launches, backward = "
        f"dstats + apply + 2 small launches ({m['small_launch_s'] * 1e6:.0f} µs each). BatchNorm floor: "
        "forward 3 passes (read x twice, write y), backward 5 passes (read x and dy twice, write dx), "
        "N·C·H·W elements each at HBM bandwidth.",
        "",
        _md_table(
            [h for _, h in LAYER_COLUMNS], [[_cell(r[c]) for c, _ in LAYER_COLUMNS] for r in report["layer"]]
        ),
    ]
    if report.get("notes"):
        parts += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(parts) + "\n"


def print_tables(report: dict) -> None:
    cols = KERNEL_COLUMNS
    widths = [max(len(h), *(len(str(_cell(k[c]))) for k in report["kernels"])) for c, h in cols]
    print("  ".join(h.rjust(w) for (_, h), w in zip(cols, widths, strict=True)))
    for k in report["kernels"]:
        print("  ".join(str(_cell(k[c])).rjust(w) for (c, _), w in zip(cols, widths, strict=True)))
    print()
    for d, v in report["per_element"].items():
        print(f"c = 64, {d}: forward {v['fwd']} and backward {v['bwd']} warp-instructions per element")
    print()
    cols = LAYER_COLUMNS
    widths = [max(len(h), *(len(str(_cell(r[c]))) for r in report["layer"])) for c, h in cols]
    print("  ".join(h.rjust(w) for (_, h), w in zip(cols, widths, strict=True)))
    for r in report["layer"]:
        print("  ".join(str(_cell(r[c])).rjust(w) for (c, _), w in zip(cols, widths, strict=True)))


def build_report(
    so_path: str | list[str], tag: str, arch: str = "sm_90", source: str | None = None, legacy: bool = False
) -> dict:
    paths = [so_path] if isinstance(so_path, (str, os.PathLike)) else list(so_path)
    geometry = None if legacy else extension_geometry(paths[0])
    kernels = cuda_kernels(paths, arch, geometry)
    if not kernels:
        raise RuntimeError(f"no streaming kernels of the cuda backend for {arch} in {paths}")
    notes = []
    if geometry is None:
        notes.append(
            "The extension exports no kernel geometry (intl_kernels._C.small_kernel_shapes): tile columns "
            "and dynamic shared memory are those of csrc at commit 3ccc53f (legacy_geometry)."
        )
    if any(k["inner_loops"] for k in kernels):
        notes.append(
            "Kernels with inner loops in the tile loop: their trip counts come from the work per thread and "
            "tile (legacy_trips); loops over a row's columns run only in the warps that hold the c row "
            "threads and are weighted by that share; the first-tile pivot loop of stats is counted in every "
            "tile (it runs in the first only)."
        )
    return {
        "tag": tag,
        "source": source
        or ", ".join(os.path.relpath(p, ROOT) if str(p).startswith(str(ROOT)) else str(p) for p in paths),
        "arch": arch,
        "model": MODEL,
        "limits": ARCH_LIMITS[arch],
        "kernels": kernels,
        "per_element": per_element_totals(kernels),
        "layer": layer_summary(kernels),
        "notes": notes,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--so",
        action="append",
        default=None,
        help="shared object or cubin, repeatable (default: intl_kernels/_C*.so)",
    )
    ap.add_argument(
        "--legacy", action="store_true", help="the build predates small_kernel_shapes: use legacy_geometry"
    )
    ap.add_argument("--tag", default="after")
    ap.add_argument("--arch", default="sm_90", choices=sorted(ARCH_LIMITS))
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--source", default=None, help="how the report names the file (default: its path)")
    ap.add_argument(
        "--backend",
        default="both",
        choices=("cuda", "triton", "both"),
        help="cuda: the extension's kernels; triton: verify.sass_triton (sm_90 only); both (default)",
    )
    args = ap.parse_args(argv)
    reports = {}
    if args.backend in ("cuda", "both"):
        so = args.so or default_so()
        report = build_report(so, args.tag, args.arch, args.source, args.legacy)
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"sass-report-cuda-{args.tag}"
        stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        stem.with_suffix(".md").write_text(render_markdown(report))
        print_tables(report)
        print(f"\nwrote {stem}.json and {stem}.md")
        reports["cuda"] = report
    if args.backend in ("triton", "both"):
        from verify import sass_triton

        reports["triton"] = sass_triton.main(["--tag", args.tag, "--out-dir", args.out_dir])
    return reports


if __name__ == "__main__":
    main()
