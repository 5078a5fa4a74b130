"""Physics-informed training with torchderiv: the examples run, their losses have the gradients of the usual
autograd-loop formulation, torch.compile works on a torchderiv loss, and DistributedDataParallel averages
the gradients of a torchderiv loss correctly across processes."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import torchderiv

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import burgers  # noqa: E402
import ddp_poisson  # noqa: E402
import heat_highdim  # noqa: E402
import poisson2d  # noqa: E402
from _common import autograd_laplacian, autograd_partials, mlp  # noqa: E402

F64 = torch.float64


@pytest.fixture(autouse=True)
def _restore_threads():
    """The examples' ``main`` sets the thread count (``--threads 1``: fastest for their small networks)."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _grads(loss, net):
    return torch.autograd.grad(loss, list(net.parameters()))


def _assert_same_loss_and_grads(loss_a, loss_b, net, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=atol)
    for ga, gb in zip(_grads(loss_a, net), _grads(loss_b, net)):
        torch.testing.assert_close(ga, gb, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- the examples run


def test_poisson_example_trains(capsys):
    res = poisson2d.main(["--steps", "300", "--points", "128", "--boundary-points", "32", "--width", "16",
                          "--depth", "2", "--lr", "1e-2", "--log-every", "0", "--threads", "1"])
    assert len(res.losses) == 300 and len(res.times) == 300
    first, last = res.losses[0], sum(res.losses[-10:]) / 10
    assert last < 0.2 * first, (first, last)
    assert res.rel_l2 < 0.5
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out.startswith("mode=torchderiv steps=300 time/step=") and "rel_l2=" in out


def test_poisson_example_autograd_mode_follows_the_same_trajectory():
    """Same seed, same points: the two modes differ only by floating-point rounding."""
    argv = ["--steps", "5", "--points", "64", "--boundary-points", "16", "--width", "8", "--depth", "2",
            "--log-every", "0", "--threads", "1", "--float64"]
    a = poisson2d.main(argv)
    b = poisson2d.main(argv + ["--autograd"])
    torch.testing.assert_close(torch.tensor(a.losses), torch.tensor(b.losses), rtol=1e-9, atol=0)


def test_burgers_and_heat_examples_run():
    r = burgers.main(["--steps", "20", "--points", "64", "--data-points", "16", "--width", "8", "--depth", "2",
                      "--log-every", "0", "--threads", "1"])
    assert r.losses[-1] < r.losses[0]
    r = heat_highdim.main(["--steps", "10", "--dim", "6", "--points", "32", "--data-points", "32", "--width", "8",
                           "--depth", "2", "--log-every", "0", "--threads", "1"])
    assert len(r.losses) == 10 and all(map(torch.isfinite, torch.tensor(r.losses)))


# ----------------------------------------------------------------------------- gradients w.r.t. the parameters


def test_poisson_loss_gradient_equals_autograd_loop():
    torch.manual_seed(0)
    net = mlp(2, 16, 3, dtype=F64)
    gen = torch.Generator().manual_seed(1)
    x_in, x_b = poisson2d.sample_interior(50, gen, F64), poisson2d.sample_boundary(20, gen, F64)
    _assert_same_loss_and_grads(poisson2d.poisson_loss(net, x_in, x_b),
                                poisson2d.poisson_loss(net, x_in, x_b, autograd=True), net)


def test_burgers_loss_gradient_equals_autograd_loop():
    torch.manual_seed(0)
    net = mlp(2, 16, 3, dtype=F64)
    batch = burgers.sample(50, 10, 10, torch.Generator().manual_seed(1), F64)
    _assert_same_loss_and_grads(burgers.burgers_loss(net, *batch), burgers.burgers_loss(net, *batch, autograd=True),
                                net)


def test_heat_loss_gradient_equals_autograd_loop():
    torch.manual_seed(0)
    net = mlp(21, 16, 2, dtype=F64)
    batch = heat_highdim.sample(30, 10, 20, torch.Generator().manual_seed(1), F64)
    _assert_same_loss_and_grads(heat_highdim.heat_loss(net, *batch),
                                heat_highdim.heat_loss(net, *batch, autograd=True), net)


def test_reference_helpers_match_torchderiv():
    torch.manual_seed(0)
    net = mlp(3, 8, 2, dtype=F64)
    x = torch.rand(7, 3, dtype=F64)
    spec = ["", "t", "x", "xx", "ty"]
    a = torchderiv.partials(net, x, spec, coords="txy")
    b = autograd_partials(net, x, spec, "txy")
    for k in spec:
        torch.testing.assert_close(a[k], b[k])
    torch.testing.assert_close(torchderiv.laplacian(net, x, dims=[1, 2]), autograd_laplacian(net, x, dims=[1, 2]))


def test_parameter_update_is_seen_by_the_cached_graph():
    """The derivative graph is built once; after optimizer steps it must use the updated weights."""
    torch.manual_seed(0)
    net = mlp(2, 8, 2, dtype=F64)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x_in, x_b = torch.rand(16, 2, dtype=F64), torch.rand(8, 2, dtype=F64)
    for _ in range(3):
        opt.zero_grad()
        loss = poisson2d.poisson_loss(net, x_in, x_b)
        torch.testing.assert_close(loss, poisson2d.poisson_loss(net, x_in, x_b, autograd=True))
        loss.backward()
        opt.step()


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.slow  # inductor compiles C++ kernels: 30-60 s on 2 cores the first time, ~5 s with its disk cache warm
def test_torch_compile_of_a_torchderiv_loss_matches_eager():
    torch.manual_seed(0)
    net = mlp(2, 8, 2)
    gen = torch.Generator().manual_seed(0)
    batch = (poisson2d.sample_interior(64, gen, torch.float32), poisson2d.sample_boundary(16, gen, torch.float32))
    params = list(net.parameters())

    def loss_fn(x_in, x_b):
        return poisson2d.poisson_loss(net, x_in, x_b)

    torch._dynamo.reset()
    fn, dloss, dgrad = poisson2d.compiled_loss(loss_fn, batch, params)  # checks loss and grads against eager
    assert dloss < 1e-5 and dgrad < 1e-4, (dloss, dgrad)
    # whole loss in one graph: no graph break inside torchderiv once its derivative graph is cached
    explain = torch._dynamo.explain(loss_fn)(*batch)
    assert explain.graph_break_count == 0, [b.reason for b in explain.break_reasons]
    # a few training steps through the compiled loss, on fresh points, with the eager loss alongside
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(3):
        batch = (poisson2d.sample_interior(64, gen, torch.float32), poisson2d.sample_boundary(16, gen, torch.float32))
        opt.zero_grad()
        loss = fn(*batch)
        torch.testing.assert_close(loss, loss_fn(*batch), rtol=1e-5, atol=1e-6)
        loss.backward()
        opt.step()


# ----------------------------------------------------------------------------- DistributedDataParallel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _union_batch():
    gen = torch.Generator().manual_seed(7)
    return poisson2d.sample_interior(64, gen, F64), poisson2d.sample_boundary(32, gen, F64)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    ddp_poisson.init(rank, world, device="cpu")  # gloo on the CPU whatever GPUs the machine has
    try:
        torch.manual_seed(0)
        net = mlp(2, 16, 2, dtype=F64)
        model = torch.nn.parallel.DistributedDataParallel(ddp_poisson.PoissonTerms(net))
        x_in, x_b = (t.chunk(world)[rank] for t in _union_batch())  # this process's share of the points
        lap, u_b = model(x_in, x_b)
        poisson2d.loss_from(lap, x_in, u_b, x_b).backward()
        if rank == 0:
            torch.save([p.grad for p in net.parameters()], out)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # spawns two processes
def test_ddp_two_processes_average_to_the_union_gradient(tmp_path):
    out = str(tmp_path / "grads.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    ddp_grads = torch.load(out)
    torch.manual_seed(0)
    net = mlp(2, 16, 2, dtype=F64)
    poisson2d.poisson_loss(net, *_union_batch()).backward()
    for g_ddp, p in zip(ddp_grads, net.parameters()):
        torch.testing.assert_close(g_ddp, p.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs a POSIX system")
def test_ddp_example_script_main_runs_in_one_process(monkeypatch):
    """``ddp_poisson.main`` with a world of one (what torchrun sets up for --nproc_per_node=1)."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    r = ddp_poisson.main(["--steps", "5", "--points", "32", "--boundary-points", "8", "--width", "8",
                          "--log-every", "0", "--threads", "1"])
    assert len(r.losses) == 5 and r.mode == "torchderiv-ddp1"
