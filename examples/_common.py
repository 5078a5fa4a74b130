"""Pieces shared by the physics-informed examples: arguments, the network, reference derivatives by
``torch.autograd.grad`` loops (the ``--autograd`` mode), the training loop, timing and the final report.

Not an example by itself: ``poisson2d.py``, ``burgers.py``, ``heat_highdim.py``, ``ddp_poisson.py`` and
``compare.py`` import it (they run as scripts from any directory; Python puts ``examples/`` on ``sys.path``).
Each problem module exposes ``build(argv) -> Problem`` and ``main(argv) -> Result``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

# ----------------------------------------------------------------------------- arguments


def parser(description: str, *, steps: int, lr: float, points: int, width: int, depth: int,
           log_every: int = 500, lr_final: float = 0.01, lbfgs: int = 0) -> argparse.ArgumentParser:
    """The options every example has; the defaults are each problem's tuned settings."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=steps, help="Adam steps")
    p.add_argument("--lr", type=float, default=lr, help="initial Adam learning rate")
    p.add_argument("--lr-final", type=float, default=lr_final,
                   help="the learning rate decays exponentially to lr * lr_final at the last step")
    p.add_argument("--points", type=int, default=points, help="interior collocation points, resampled every step")
    p.add_argument("--width", type=int, default=width, help="hidden width of the tanh MLP")
    p.add_argument("--depth", type=int, default=depth, help="number of hidden layers")
    p.add_argument("--lbfgs", type=int, default=lbfgs,
                   help="L-BFGS iterations after Adam, on a fixed set of 4 x the points of an Adam step")
    p.add_argument("--seed", type=int, default=0, help="seeds the initial weights and the collocation points")
    p.add_argument("--autograd", action="store_true",
                   help="reference mode: the same training with derivatives from torch.autograd.grad("
                        "create_graph=True) loops instead of torchderiv")
    p.add_argument("--float64", action="store_true", help="train in double precision")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads; 0: torch's default. One thread is fastest for these small networks "
                        "(and far more robust on a shared machine)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--log-every", type=int, default=log_every, help="progress line every N steps (0: none)")
    return p


def setup(args: argparse.Namespace) -> dict:
    """Seed and threads; returns the tensor options to train with: ``dict(dtype=..., device=...)``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return {"dtype": torch.float64 if args.float64 else torch.float32, "device": torch.device(args.device)}


def mode_name(args: argparse.Namespace) -> str:
    if args.autograd:
        return "autograd"
    return "torchderiv+compile" if getattr(args, "compile", False) else "torchderiv"


# ----------------------------------------------------------------------------- the network


def mlp(d_in: int, width: int, depth: int, d_out: int = 1, *, dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu") -> nn.Sequential:
    """``d_in -> width -> ... -> width -> d_out`` with ``depth`` tanh hidden layers, Xavier-initialized."""
    sizes = [d_in] + [width] * depth + [d_out]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        lin = nn.Linear(a, b)
        nn.init.xavier_normal_(lin.weight)
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(dtype=dtype, device=device)


# ----------------------------------------------------------------------------- the reference: autograd loops


def autograd_partials(f: Callable[[Tensor], Tensor], x: Tensor, spec: Sequence, coords: str | None = None) -> dict:
    """What ``torchderiv.partials(f, x, spec, coords=coords)`` returns, computed the usual way: one
    ``torch.autograd.grad(..., create_graph=True)`` per distinct lower-order derivative, so that the loss
    stays differentiable w.r.t. the parameters (a double backward later). ``f`` maps ``[B, n]`` to ``[B, 1]``.

    Each call of ``grad`` on ``d.sum()`` returns the whole gradient of ``d``, so ``u_x`` and ``u_t`` come
    from one call and ``u_xx`` from a second: the minimal number of backward passes for this formulation.
    """
    x = x.detach().requires_grad_(True)
    u = f(x)
    grads: dict[tuple[int, ...], Tensor] = {}  # multi-index -> the full gradient of that derivative
    value: dict[tuple[int, ...], Tensor] = {(): u}

    def get(alpha: tuple[int, ...]) -> Tensor:
        if alpha not in value:
            lower = alpha[:-1]
            if lower not in grads:
                grads[lower] = torch.autograd.grad(get(lower).sum(), x, create_graph=True)[0]
            value[alpha] = grads[lower][:, alpha[-1] : alpha[-1] + 1]
        return value[alpha]

    out = {}
    for key in spec:
        alpha = tuple(coords.index(c) for c in key) if isinstance(key, str) else tuple(key)
        out[key] = get(tuple(sorted(alpha)))
    return out


def autograd_laplacian(f: Callable[[Tensor], Tensor], x: Tensor, dims: Sequence[int] | None = None) -> Tensor:
    """``torchderiv.laplacian(f, x, dims=dims)`` the usual way: the gradient, then one
    ``torch.autograd.grad(create_graph=True)`` per coordinate for the diagonal of the Hessian."""
    dims = range(x.shape[1]) if dims is None else dims
    d = autograd_partials(f, x, [(i, i) for i in dims])
    return sum(d.values())


# ----------------------------------------------------------------------------- training


def rel_l2(pred: Tensor, exact: Tensor) -> float:
    """Relative L2 error ``||pred - exact|| / ||exact||``."""
    return float(torch.linalg.vector_norm(pred - exact) / torch.linalg.vector_norm(exact))


@dataclass
class Result:
    mode: str
    steps: int
    times: list[float] = field(default_factory=list)  # seconds of each step: loss, backward, optimizer
    losses: list[float] = field(default_factory=list)
    rel_l2: float = float("nan")
    lbfgs_iters: int = 0
    lbfgs_s: float = 0.0

    @property
    def ms_per_step(self) -> float:
        """Median step time in ms, without the first step (which traces the derivative graph, or compiles)."""
        t = self.times[1:] or self.times
        return 1e3 * statistics.median(t)

    @property
    def first_step_s(self) -> float:
        return self.times[0] if self.times else float("nan")

    def line(self) -> str:
        lbfgs = f"lbfgs={self.lbfgs_iters} lbfgs_time={self.lbfgs_s:.1f}s " if self.lbfgs_iters else ""
        return (f"mode={self.mode} steps={self.steps} time/step={self.ms_per_step:.2f}ms "
                f"first_step={self.first_step_s:.2f}s total={sum(self.times) + self.lbfgs_s:.1f}s {lbfgs}"
                f"loss={self.losses[-1]:.3e} rel_l2={self.rel_l2:.3e}")


@dataclass
class Problem:
    """One physics-informed problem at the settings of its arguments."""

    args: argparse.Namespace
    net: nn.Module
    sample: Callable[[], Sequence[Tensor]]  # the fresh collocation points of one step
    loss: Callable[..., Tensor]  # loss(*points, autograd=False)
    evaluate: Callable[[], float]  # relative L2 error on the test set
    describe: str  # one line: the problem, the network, the points

    def loss_fn(self, autograd: bool | None = None) -> Callable[..., Tensor]:
        autograd = self.args.autograd if autograd is None else autograd
        return lambda *points: self.loss(*points, autograd=autograd)


def run(problem: Problem, loss_fn: Callable[..., Tensor] | None = None) -> Result:
    """Train ``problem`` in the mode its arguments select (``loss_fn`` overrides its loss, e.g. compiled)."""
    a = problem.args
    mode = "torch.autograd.grad loops" if a.autograd else mode_name(a)
    print(f"{problem.describe}; {mode}; Adam lr {a.lr} -> {a.lr * a.lr_final:g}, {a.steps} steps, "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    return train(problem.net, loss_fn or problem.loss_fn(), problem.sample, problem.evaluate, a)


def train(model: nn.Module, loss_fn: Callable[..., Tensor], sample: Callable[[], tuple], evaluate: Callable[[], float],
          args: argparse.Namespace, *, params=None, log: bool = True, mode: str | None = None) -> Result:
    """Adam with an exponentially decaying learning rate; ``sample()`` draws the collocation points of a
    step (outside the timed region), ``loss_fn(*points)`` builds the loss, ``evaluate()`` is the relative
    L2 error on a test set. Prints a progress line every ``args.log_every`` steps and the final line
    (``log=False``: neither, e.g. on the other ranks of a multi-process run)."""
    params = list(model.parameters()) if params is None else list(params)
    opt = torch.optim.Adam(params, lr=args.lr, fused=True)  # the fused kernel: less optimizer overhead per step
    sync = torch.cuda.synchronize if params[0].is_cuda else (lambda: None)
    gamma = args.lr_final ** (1.0 / max(args.steps, 1))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma)
    res = Result(mode or mode_name(args), args.steps)
    for step in range(1, args.steps + 1):
        batch = sample()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(*batch)
        loss.backward()
        opt.step()
        sync()
        res.times.append(time.perf_counter() - t0)
        sched.step()
        res.losses.append(loss.item())
        if log and args.log_every and (step % args.log_every == 0 or step == 1):
            print(f"step {step:6d}  loss {res.losses[-1]:.3e}  rel_l2 {evaluate():.3e}  "
                  f"{1e3 * statistics.median(res.times[1:] or res.times):7.2f} ms/step", flush=True)
    if args.lbfgs:
        lbfgs(params, loss_fn, sample, args.lbfgs, res, evaluate if log else None)
    res.rel_l2 = evaluate()
    if log:
        print(res.line(), flush=True)
    return res


def lbfgs(params: list[Tensor], loss_fn: Callable[..., Tensor], sample: Callable[[], tuple], iters: int,
          res: Result, evaluate: Callable[[], float] | None) -> None:
    """Refine with L-BFGS (strong Wolfe line search) on a fixed set of 4 Adam batches of points."""
    batch = [torch.cat(parts) for parts in zip(*(sample() for _ in range(4)))]
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=iters, max_eval=int(1.25 * iters), history_size=50,
                            tolerance_grad=0.0, tolerance_change=0.0, line_search_fn="strong_wolfe")
    evals = 0

    def closure():
        nonlocal evals
        evals += 1
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(*batch)
        loss.backward()
        return loss

    t0 = time.perf_counter()
    opt.step(closure)
    res.lbfgs_s = time.perf_counter() - t0
    res.lbfgs_iters = opt.state[opt._params[0]]["n_iter"]
    res.losses.append(closure().item())
    if evaluate is not None:
        print(f"L-BFGS: {res.lbfgs_iters} iterations, {evals} loss evaluations, {res.lbfgs_s:.1f}s  "
              f"loss {res.losses[-1]:.3e}  rel_l2 {evaluate():.3e}", flush=True)


def no_grad_eval(model: nn.Module, x: Tensor, exact: Tensor) -> Callable[[], float]:
    """``evaluate`` for :func:`train`: relative L2 error of ``model(x)`` against ``exact``."""

    def evaluate() -> float:
        with torch.no_grad():
            return rel_l2(model(x), exact)

    return evaluate
