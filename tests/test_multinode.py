"""Two nodes on one machine: the README's two-node command, one torchrun agent in each of two network
namespaces joined by a veth pair (c10d rendezvous, gloo over their own addresses), trains as the
single-node two-process run does; SIGKILLing one node's agent takes its worker with it, and the node
started again with the same command re-forms the run, which resumes from the last checkpoint and
finishes in the same state (CPU, tiny runs). Needs root and iproute2: skipped without them, except
where CI is set in the environment, where that is a failure (CI runs as root and must run it)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

pytest.importorskip("torchvision", reason="the training tests need torchvision")
from test_train import ROOT, make_image_folder  # noqa: E402
from torchrun_helpers import (  # noqa: E402
    NO_SHARED_STORE,
    PER_CLASS,
    TRAIN,
    Processes,
    alive,
    assert_same_final_state,
    checkpoint_steps_before,
    env,
    finish,
    is_checkpoint_step,
    pretrain_args,
    resumed_steps,
    round_rows,
    start_reference,
    torchrun,
    wait_for,
    worker,
)

from train.lock import LOCK_NAME  # noqa: E402

SUBNET = "10.231.0"  # the addresses live inside the two namespaces only: parallel runs cannot collide
IFNAME = "intl0"  # both veth ends carry this name inside their namespace: one GLOO_SOCKET_IFNAME
NS_PREFIX = "intl-test"  # namespaces are named intl-test-<pid of the test process>-<tag>-<0 or 1>
RDZV_PORT = 29400
KILL_AT_STEP = 23  # node 1's agent is SIGKILLed once stats.jsonl reaches this step
LAST_STEP = 70


def _ip() -> str | None:
    return shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin")


def _cannot(reason: str) -> None:
    """Skip where namespaces cannot be made; fail in CI, which runs as root and must run this test."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run this test (as root, with iproute2)")
    pytest.skip(reason)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _delete_stale_namespaces(ip: str) -> None:
    """Delete the namespaces of test processes that are gone (killed before their teardown ran);
    those of running ones, in parallel test processes, are left alone."""
    out = subprocess.run([ip, "netns", "list"], capture_output=True, text=True).stdout
    for name in (line.split()[0] for line in out.splitlines() if line.strip()):
        owner = re.fullmatch(rf"{NS_PREFIX}-(\d+)-[0-9a-f]+-[01]", name)
        if owner and not _pid_exists(int(owner.group(1))):
            subprocess.run([ip, "netns", "del", name], capture_output=True)


@pytest.fixture
def namespaces():
    """Two network namespaces with a veth pair between them, ``{SUBNET}.1`` and ``{SUBNET}.2`` on
    interfaces named ``IFNAME``, loopback up: ``[(name, address), ...]``. Names are unique per test
    process and call (pytest-xdist workers each make their own); deleted at the end, also after a
    failure (the veth pair goes with them), and at the next run if the test process was killed."""
    ip = _ip()
    if ip is None:
        _cannot("network namespaces need iproute2's ip command, not found here")
    if os.geteuid() != 0:
        _cannot("network namespaces need root (ip netns add); run as root, as CI does")
    _delete_stale_namespaces(ip)
    names = [f"{NS_PREFIX}-{os.getpid()}-{uuid.uuid4().hex[:8]}-{i}" for i in (0, 1)]
    made: list[str] = []

    def run(*args: str) -> None:
        subprocess.run([ip, *args], check=True, capture_output=True, text=True)

    try:
        for name in names:
            try:
                run("netns", "add", name)
            except subprocess.CalledProcessError as err:
                if not made:  # the first one: not allowed here (a container without CAP_SYS_ADMIN)
                    _cannot(f"cannot create a network namespace here: {err.stderr.strip()}")
                raise
            made.append(name)
        # The pair is made inside the namespaces: no interface appears in the host's, even for a moment.
        run("-n", names[0], "link", "add", IFNAME, "type", "veth", "peer", "name", IFNAME, "netns", names[1])
        out = []
        for i, name in enumerate(names):
            address = f"{SUBNET}.{i + 1}"
            run("-n", name, "addr", "add", f"{address}/24", "dev", IFNAME)
            run("-n", name, "link", "set", IFNAME, "up")
            run("-n", name, "link", "set", "lo", "up")
            out.append((name, address))
        yield out
    finally:
        for name in made:
            subprocess.run([ip, "netns", "del", name], capture_output=True)


@pytest.fixture
def procs():
    p = Processes()
    yield p
    p.stop()  # before the namespaces' finalizer (fixtures are torn down in reverse order)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"), per_class=PER_CLASS, size=16, splits=("train",))


def _check_readme(launcher: list[str]) -> None:
    """The README's two-node command has the launcher flags and environment this test runs with, and
    its text names what the namespaces add to it."""
    text = (ROOT / "train" / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    (block,) = [b for b in blocks if "--nnodes 2" in b and "intl_kernels.train.pretrain" in b]
    for word in [*(f"{k}={v}" for k, v in NO_SHARED_STORE.items()), *launcher[::2]]:
        assert word in block, f"train/README.md's two-node command no longer has {word}"
    for word in ("--local-addr", "GLOO_SOCKET_IFNAME", "is_host=1"):
        assert word in text, f"train/README.md no longer explains {word}"


@pytest.mark.slow
def test_two_nodes_in_network_namespaces_train_as_one_node_and_survive_a_killed_node(
    tmp_path, data, namespaces, procs
):
    (ns0, addr0), (ns1, addr1) = namespaces
    # The README's command, with what these namespaces need: node 0 hosts the rendezvous store
    # (is_host: its address is not the one the shared host name resolves to), each node names the
    # address the other reaches it at (--local-addr), and gloo uses the veth (GLOO_SOCKET_IFNAME).
    endpoint = f"{addr0}:{RDZV_PORT}"
    launcher = ["--nnodes", "2", "--nproc-per-node", "1", "--max-restarts", "1"]
    launcher += ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "intl-test"]
    _check_readme(launcher)
    exp = tmp_path / "exp"
    train = pretrain_args(data, exp, LAST_STEP) + TRAIN
    environ = env(GLOO_SOCKET_IFNAME=IFNAME)

    def node(ns: str, address: str, log: Path, *extra: str) -> subprocess.Popen:
        cmd = [_ip(), "netns", "exec", ns, *torchrun(*launcher, "--local-addr", address, *extra), *train]
        return procs.start(cmd, log, tmp_path, environ)

    log0, log1 = tmp_path / "node0", tmp_path / "node1"
    agent0 = node(ns0, addr0, log0, "--rdzv-conf", "is_host=1")
    agent1 = node(ns1, addr1, log1)

    # Once stats.jsonl (rank 0 on node 0 writes it) reaches the step, SIGKILL node 1's agent; its
    # worker (rank 1) gets SIGTERM from the kernel (PR_SET_PDEATHSIG, train/runtime.py) and ends.
    wait_for(
        lambda: any(r.get("step", 0) >= KILL_AT_STEP for r in round_rows(exp, 0) or []),
        f"step {KILL_AT_STEP}",
        [agent0, agent1],
        log0,
    )
    rank1 = wait_for(lambda: worker(agent1, 1, 0), "rank 1 on node 1", [agent0, agent1], log1)
    procs.workers.add(rank1)
    agent1.send_signal(signal.SIGKILL)
    agent1.wait()
    wait_for(lambda: not alive(rank1), "node 1's worker to end with its agent", [agent0], log1, timeout=120)

    # Node 0's agent sees its worker fail (its peer is gone) and restarts it (--max-restarts 1); the
    # rendezvous waits for two nodes until node 1 is started again with the same command. The
    # reference run (below) trains meanwhile, in the host's network namespace.
    agent1 = node(ns1, addr1, tmp_path / "node1-again")
    reference, ref = start_reference(procs, tmp_path / "reference", data, LAST_STEP)
    err = finish(agent0, log0) + finish(agent1, tmp_path / "node1-again")

    (resumed,) = resumed_steps(err)  # printed by rank 0, on node 0 (c10d ranks nodes by address)
    assert is_checkpoint_step(resumed) and checkpoint_steps_before(KILL_AT_STEP) <= resumed < LAST_STEP
    assert not (exp / LOCK_NAME).exists()
    # The same global batch (8 = 2 nodes × 4) and seeds as the single-node two-process run: the
    # same final state within test_distributed.py's tolerance (measured: bit for bit; gloo over
    # the veth pair reduces in the same order as over loopback).
    finish(reference, tmp_path / "reference" / "ref")
    assert_same_final_state(exp, ref, rtol=1e-6, atol=1e-6)
