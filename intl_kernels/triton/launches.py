"""Launch recording: which Triton compiles and autotune benchmarks a workload triggers.

    with record() as rec:          # sm_90 without a GPU; the present GPU with one (gpu=True)
        workload()                 # calls the launchers on meta tensors: nothing executes
    rec.variants                   # distinct compiles, in first-launch order
    rec.autotune_events            # (kernel, number of configs benchmarked) per new autotune key

Triton compiles a kernel once per (specialization, options): the constexprs, which integer
arguments equal 1 or are divisible by 16, which pointers are 16-byte aligned, num_warps and
num_stages. The recorder lets Triton's own launch path compute exactly that (its binder and
argument packing, for the target's backend) and stops where Triton would compile: the
``JITFunction._do_compile`` call is recorded and skipped, so nothing is compiled or launched.
An autotuner meeting a new key "benchmarks" each pruned config by one recorded launch and keeps
the first. Without a GPU a stand-in driver reports the target, so the specializations are the
real sm_90 ones; on a GPU machine the real driver is used, and the recorded variants can be
compiled in parallel into Triton's on-disk cache before the first real launch (``compile_all``),
which then loads them instead of compiling one at a time.

Workloads run on ``meta`` tensors (shapes, dtypes and strides, no memory): for a launcher
only shapes decide what it launches (no host synchronisation, no branches on values), and a
meta tensor's data pointer has a real allocation's alignment. While recording, the triton
backend takes meta tensors and sees a GPU of ``num_sms`` multiprocessors (132: H100/H200).

Needs TRITON_INTERPRET unset (interpreted kernels do not compile).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator

import torch

H100_SMS = 132  # multiprocessors of an H100 SXM / H200, the GPUs the budgets are sized for


@dataclasses.dataclass
class Variant:
    """One distinct compile: what ``triton.compile`` is given for it (picklable)."""

    module: str
    kernel: str
    key: str  # Triton's in-memory cache key of the kernel (specialization and options)
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    target: tuple  # (backend, arch, warp_size)

    @property
    def ident(self) -> tuple:
        return (self.module, self.kernel, self.key, self.target)

    @property
    def compile_id(self) -> tuple:
        """What ``triton.compile`` builds from: signature, specialization and the parsed options.
        Launches whose in-memory keys differ only in how options were spelled (an autotuner's
        config passes num_ctas=1, a direct launch leaves it out) share it and one cubin."""
        return (
            self.module,
            self.kernel,
            tuple(self.signature.items()),
            tuple(sorted(self.constexprs.items())),
            repr(sorted(self.attrs.items())),
            repr(sorted(self.options.items())),
            self.target,
        )

    def config(self) -> str:
        """The constexprs by name, the integer arguments specialized as divisible by 16 and the
        launch options, for messages."""
        names = list(self.signature)
        meta = {names[p[0]]: v for p, v in self.constexprs.items() if len(p) == 1}
        div16 = [
            names[p[0]]
            for p, a in self.attrs.items()
            if len(p) == 1 and a and self.signature[names[p[0]]][0] == "i"
        ]
        opts = {k: self.options[k] for k in ("num_warps", "num_stages") if k in self.options}
        return f"{meta} {opts}" + (f" div16 {div16}" if div16 else "")

    def source(self):
        from triton.compiler import ASTSource

        fn = getattr(importlib.import_module(self.module), self.kernel)
        return ASTSource(fn=fn, signature=self.signature, constexprs=self.constexprs, attrs=self.attrs)

    def compile(self):
        """``triton.compile`` of this variant for its target (writes Triton's on-disk cache)."""
        import triton
        from triton.backends.compiler import GPUTarget

        return triton.compile(self.source(), target=GPUTarget(*self.target), options=dict(self.options))


@dataclasses.dataclass
class Recording:
    variants: list[Variant] = dataclasses.field(default_factory=list)
    autotune_events: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    launches: int = 0
    grids: list[tuple[str, tuple[int, int, int]]] = dataclasses.field(default_factory=list)  # per launch
    _seen: set = dataclasses.field(default_factory=set)

    @property
    def benchmarks(self) -> int:
        """Configs benchmarked on the GPU: every pruned config of every event with more than one."""
        return sum(n for _, n in self.autotune_events if n > 1)

    def per_kernel(self) -> dict[str, dict[str, int]]:
        """{kernel: {"compiles", "autotune_events", "benchmarks"}}."""
        compiles = Counter(v.kernel for v in self.variants)
        events = Counter(k for k, n in self.autotune_events if n > 1)
        benches = Counter()
        for k, n in self.autotune_events:
            if n > 1:
                benches[k] += n
        return {
            k: {"compiles": compiles[k], "autotune_events": events[k], "benchmarks": benches[k]}
            for k in sorted(set(compiles) | set(events))
        }


class _StandInDriver:
    """What ``JITFunction.run`` asks of Triton's driver, for a GPU that is not there."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return f"intl-kernels-recording-{self.target.backend}-{self.target.arch}"

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def _autocast_meta(original):
    """torch.autocast that takes device type 'meta' (as 'cpu': autocast is off in our ops)."""

    def autocast(device_type, *args, **kwargs):
        return original("cpu" if device_type == "meta" else device_type, *args, **kwargs)

    return autocast


@contextlib.contextmanager
def record(
    arch: int = 90, *, gpu: bool = False, num_sms: int | None = None, every_config: bool = False
) -> Iterator[Recording]:
    """Record the compiles and autotune events of the launches made inside the block.

    Args:
        arch: compute capability of the target without a GPU (90: H100/H200, 80: A100).
        gpu: use the present GPU's driver and target (on a GPU machine), not a stand-in.
        num_sms: multiprocessors the launchers size their grids for (default: the present
            GPU's with ``gpu``, else 132).
        every_config: every autotuned launch "benchmarks" all its pruned configs, as if its
            key were new: which config a GPU keeps for a key is not known here, and the kept
            one then runs at every shape of the key's size class, in that shape's
            specialization (the resource gate).
    """
    if os.environ.get("TRITON_INTERPRET", "0").strip() == "1":
        raise RuntimeError("launches.record: unset TRITON_INTERPRET (interpreted kernels do not compile)")
    from triton.backends.compiler import GPUTarget
    from triton.runtime import autotuner as at
    from triton.runtime import jit
    from triton.runtime.driver import driver

    from intl_kernels import _backends
    from intl_kernels.triton import whiten as W

    if num_sms is None:
        num_sms = torch.cuda.get_device_properties(0).multi_processor_count if gpu else H100_SMS
    rec = Recording()
    tuners: dict[int, tuple[object, dict]] = {}
    saved = {
        "do_compile": jit.JITFunction._do_compile,
        "run": jit.JITFunction.run,
        "bench": at.Autotuner._bench,
        "disk": at.Autotuner.check_disk_cache,
        "prune": at.Autotuner.prune_configs,
        "tune": at.Autotuner.run,
        "active": driver._active,
        "check": W._check,
        "sms": W._num_sms,
        "capability": W._capability,
        "device": _backends._DEVICE["triton"],
        "reason": _backends._triton_unavailable_reason,
        "autocast": torch.autocast,
    }
    stand_in = None if gpu else _StandInDriver(GPUTarget("cuda", arch, 32))
    touched: list = []

    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        _, _, target, _, _ = self.device_caches[device]
        v = Variant(
            self.fn.__module__,
            self.fn.__name__,
            str(key),
            dict(signature),
            dict(constexprs),
            dict(attrs),
            dict(options.__dict__),
            (target.backend, target.arch, target.warp_size),
        )
        if v.ident not in rec._seen:
            rec._seen.add(v.ident)
            rec.variants.append(v)
        touched.append((self, device))
        return None  # nothing compiled: JITFunction.run returns without launching

    def run(self, *args, **kwargs):
        rec.launches += 1
        grid = kwargs.get("grid")
        if callable(grid):
            grid = grid({**dict(zip(self.arg_names, args, strict=False)), **kwargs})
        rec.grids.append((self.fn.__name__, tuple(int(x) for x in (*grid, 1, 1)[:3])))
        return saved["run"](self, *args, **kwargs)

    def prune(self, kwargs):
        configs = saved["prune"](self, kwargs)
        if id(self) not in tuners:
            tuners[id(self)] = (self, dict(self.cache))
        name = self.base_fn.__name__ if hasattr(self, "base_fn") else self.fn.__name__
        rec.autotune_events.append((name, len(configs)))
        return configs

    def tune(self, *args, **kwargs):
        if id(self) not in tuners:
            tuners[id(self)] = (self, dict(self.cache))
        self.cache.clear()
        return saved["tune"](self, *args, **kwargs)

    def bench(self, *args, config, **meta):
        self.fn.run(*args, **dict(meta, **config.all_kwargs()))
        return [0.0, 0.0, 0.0]  # every config ties: the first is kept

    def disk(self, tuning_key, configs, bench_fn):
        bench_fn()  # recorded timings must never reach Triton's on-disk autotune cache
        return False

    jit.JITFunction._do_compile = do_compile
    jit.JITFunction.run = run
    at.Autotuner._bench = bench
    at.Autotuner.check_disk_cache = disk
    at.Autotuner.prune_configs = prune
    if every_config:
        at.Autotuner.run = tune
    if stand_in is not None:
        driver.set_active(stand_in)
    W._check = lambda fn, z: None
    W._num_sms = lambda device: num_sms
    if not gpu:
        W._capability = lambda device: divmod(arch, 10)
    _backends._DEVICE["triton"] = "meta"
    _backends._triton_unavailable_reason = lambda: None
    torch.autocast = _autocast_meta(saved["autocast"])
    try:
        yield rec
    finally:
        jit.JITFunction._do_compile = saved["do_compile"]
        jit.JITFunction.run = saved["run"]
        at.Autotuner._bench = saved["bench"]
        at.Autotuner.check_disk_cache = saved["disk"]
        at.Autotuner.prune_configs = saved["prune"]
        at.Autotuner.run = saved["tune"]
        driver._active = saved["active"]
        W._check = saved["check"]
        W._num_sms = saved["sms"]
        W._capability = saved["capability"]
        _backends._DEVICE["triton"] = saved["device"]
        _backends._triton_unavailable_reason = saved["reason"]
        torch.autocast = saved["autocast"]
        for tuner, cache in tuners.values():  # a real run must autotune for itself
            tuner.cache = cache
        if stand_in is not None:
            for fn, device in touched:
                fn.device_caches.pop(device, None)


# ---------------------------------------------------------------------------- compiling


def _compile_variant(v: Variant) -> tuple[str, float, dict | None, str | None]:
    """(kernel, seconds, resources or None, error or None); runs in a worker process."""
    start = time.perf_counter()
    try:
        compiled = v.compile()
    except Exception as exc:  # reported by the caller, with the variant
        text = str(exc).strip().splitlines()
        return v.kernel, time.perf_counter() - start, None, f"{type(exc).__name__}: {text[0] if text else ''}"
    took = time.perf_counter() - start
    from intl_kernels.triton.resources import resources

    return v.kernel, took, resources(compiled, v.target[1]), None


def compile_all(
    variants: list[Variant],
    *,
    jobs: int | None = None,
    log: Callable[[str], None] | None = None,
    deadline: float | None = None,
) -> list[tuple[Variant, float, dict | None, str | None]]:
    """Compile every variant in ``jobs`` spawned processes (Triton's on-disk cache keeps the
    cubins); returns (variant, seconds, resources, error) in the order given. A worker that
    dies fails its variant (error "worker died"); variants unfinished at ``deadline``
    (a ``time.time()`` value) come back with error "deadline"."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures import TimeoutError as FuturesTimeout
    from concurrent.futures.process import BrokenProcessPool

    jobs = max(1, min(jobs or os.cpu_count() or 1, len(variants) or 1))
    results: list = [None] * len(variants)
    start = time.time()
    pool = ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"))
    futures = {pool.submit(_compile_variant, v): i for i, v in enumerate(variants)}
    timeout = None if deadline is None else max(0.0, deadline - time.time())
    stopped = False
    try:
        for done, fut in enumerate(as_completed(futures, timeout=timeout), 1):
            i = futures[fut]
            try:
                _, took, res, error = fut.result()
            except BrokenProcessPool:
                took, res, error = 0.0, None, "worker died"
            results[i] = (variants[i], took, res, error)
            if log and (done % 25 == 0 or done == len(variants)):
                log(f"{done}/{len(variants)} compiled in {time.time() - start:.0f} s with {jobs} processes")
    except FuturesTimeout:
        stopped = True
        for proc in list(getattr(pool, "_processes", {}).values()):  # stop compiles in flight
            proc.kill()
    finally:
        # Waiting for a pool whose work is done joins its management thread now; left running,
        # it races the interpreter's exit ("Exception ignored ... Bad file descriptor").
        pool.shutdown(wait=not stopped, cancel_futures=True)
    return [r if r is not None else (variants[i], 0.0, None, "deadline") for i, r in enumerate(results)]
