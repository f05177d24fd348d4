"""Reproduce the paper's two linear claims next to their baselines.

Bansal, Advani, Cox, Saxe (2018) claim that Minnorm training reaches

1. the minimum-norm interpolant faster than L2-regularized gradient descent, and
2. the max-margin direction faster than gradient descent on the logistic loss.

Both are checked here on linear models, full batch, float64, with the settings that
``shared/design/ALGORITHM.md`` and our measurements say work: ``torch.optim.SGD`` with
lr=1.0 on the weight (and on the bias, a separate param group),
``dual_lr = c / lambda_max(X X^T)`` and ``damping = dual_lr`` (the alternating scheme).
``c`` defaults to 1.0, the dual counterpart of the baselines' fixed 1/L step.

Every method is an ordinary PyTorch loop (``nn.Linear``, autograd, ``torch.optim.SGD``)
on the same model from the same initialization, so wall times compare like with like.
Wall times are reported, never asserted on. This is a script, not a test.

Usage::

    .venv/bin/python benchmarks/paper_claims.py [--seeds 3] [--max-iterations 20000]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from minnorm_audit import Minnorm

TOLERANCES = (1e-3, 1e-6)
# A run stops early once its error stayed at or below CONVERGED_ERROR for CONVERGED_WINDOW
# iterations in a row (one dip is not enough: Minnorm's direction can swing through the
# target, and projected dual ascent can sit on a plateau for thousands of iterations).
CONVERGED_ERROR = 1e-9
CONVERGED_WINDOW = 1000

# Claim 1: regression with more features than examples.
REGRESSION_EXAMPLES = 50
REGRESSION_FEATURES = 200
REGRESSION_TARGETS = 3
RIDGE_ALPHAS = (1e-4, 1e-2)

# Claim 2: separable binary data, as (name, features, examples, gap). Points are drawn
# from N(0, I_d) and labelled by a random unit teacher u with offset TEACHER_OFFSET;
# points with |u.x + offset| < gap are redrawn, so the data's margin is at least gap.
MARGIN_PROBLEMS = (
    ("2-D", 2, 40, 0.2),
    ("50-D", 50, 200, 0.0),
)
TEACHER_OFFSET = 0.25


# ---------------------------------------------------------------------------- loop
@dataclass
class RunResult:
    """One method on one problem and seed.

    ``iterations_to[tol]`` is the first iteration from which the error stayed at or
    below ``tol`` until the run stopped (``None``: above ``tol`` when it stopped);
    ``seconds_to[tol]`` the wall time at that iteration; ``first_crossing[tol]`` the
    first iteration with error at or below ``tol`` at all.
    """

    method: str
    problem: str
    seed: int
    max_iterations: int
    iterations_to: dict[float, int | None] = field(default_factory=dict)
    seconds_to: dict[float, float | None] = field(default_factory=dict)
    first_crossing: dict[float, int | None] = field(default_factory=dict)
    iterations_run: int = 0
    seconds_run: float = 0.0
    final_error: float = float("nan")
    stop_reason: str = "budget"
    floor: float | None = None


def run_loop(
    method: str,
    problem: str,
    seed: int,
    step: Callable[[], None],
    error: Callable[[], float],
    max_iterations: int,
    *,
    lower_bound: Callable[[], float] | None = None,
    floor: float | None = None,
    tolerances: Sequence[float] = TOLERANCES,
) -> RunResult:
    """Call ``step`` until the budget is spent, the run converged, or it cannot reach
    any tolerance any more.

    The error is evaluated after every step, at the same cost for every method.

    Parameters
    ----------
    lower_bound : callable, optional
        A certified lower bound on the error at every later iteration (for GD on a
        quadratic: the fixed point's error minus the distance to the fixed point, which
        never grows). The run stops ("at fixed point") once it exceeds every tolerance.
    floor : float, optional
        The error of the method's fixed point, stored for the report.
    """
    result = RunResult(method, problem, seed, max_iterations, floor=floor)
    result.iterations_to = {tol: None for tol in tolerances}
    result.seconds_to = {tol: None for tol in tolerances}
    result.first_crossing = {tol: None for tol in tolerances}
    current = error()
    below_since: int | None = None
    start = time.perf_counter()
    iteration = 0
    while iteration < max_iterations:
        step()
        iteration += 1
        current = error()
        elapsed = time.perf_counter() - start
        for tol in tolerances:
            if not current <= tol:  # NaN counts as above
                result.iterations_to[tol] = result.seconds_to[tol] = None
            elif result.iterations_to[tol] is None:
                result.iterations_to[tol] = iteration
                result.seconds_to[tol] = elapsed
                if result.first_crossing[tol] is None:
                    result.first_crossing[tol] = iteration
        if not math.isfinite(current):
            result.stop_reason = "diverged"
            break
        if current <= CONVERGED_ERROR:
            below_since = iteration if below_since is None else below_since
            if iteration - below_since >= CONVERGED_WINDOW:
                result.stop_reason = "converged"
                break
        else:
            below_since = None
        if lower_bound is not None and lower_bound() > max(tolerances):
            result.stop_reason = "at fixed point"
            break
    result.seconds_run = time.perf_counter() - start
    result.iterations_run = iteration
    result.final_error = current
    return result


# ---------------------------------------------------------------------------- shared
def linear_model(initial_weight: torch.Tensor, bias: bool) -> nn.Linear:
    """A float64 ``nn.Linear`` with the given weight (and a zero bias)."""
    out_features, in_features = initial_weight.shape
    model = nn.Linear(in_features, out_features, bias=bias).double()
    with torch.no_grad():
        model.weight.copy_(initial_weight)
        if bias:
            model.bias.zero_()
    return model


def largest_eigenvalue(matrix: torch.Tensor) -> float:
    """``lambda_max(M M^T)`` (= ``lambda_max(M^T M)`` = ``sigma_max(M)^2``)."""
    return float(torch.linalg.matrix_norm(matrix, ord=2)) ** 2


def minnorm_optimizer(
    model: nn.Linear, inputs: torch.Tensor, num_outputs: int, form: str, dual_c: float
) -> Minnorm:
    """SGD at lr=1.0 (one param group per parameter), ``dual_lr = c / lambda_max(X X^T)``,
    ``damping = dual_lr``, float64 multipliers."""
    base = torch.optim.SGD([{"params": [p], "lr": 1.0} for p in model.parameters()], lr=1.0)
    dual_lr = dual_c / largest_eigenvalue(inputs)
    return Minnorm(
        base,
        num_examples=inputs.shape[0],
        num_outputs=num_outputs,
        form=form,  # type: ignore[arg-type]
        dual_lr=dual_lr,
        damping=dual_lr,
        model=model,
        multiplier_dtype=torch.float64,
    )


# ---------------------------------------------------------------------------- claim 1
@dataclass
class RegressionProblem:
    inputs: torch.Tensor  # (n, d)
    targets: torch.Tensor  # (n, k)
    initial_weight: torch.Tensor  # (k, d)
    solution: torch.Tensor  # (pinv(X) @ T)^T, in the weight's (k, d) layout


def regression_problem(seed: int) -> RegressionProblem:
    """X ~ N(0, 1)/sqrt(d), T ~ N(0, 1), initial W ~ N(0, 1/d); n=50 < d=200."""
    rng = np.random.default_rng(seed)
    n, d, k = REGRESSION_EXAMPLES, REGRESSION_FEATURES, REGRESSION_TARGETS
    inputs = rng.standard_normal((n, d)) / math.sqrt(d)
    targets = rng.standard_normal((n, k))
    initial_weight = rng.standard_normal((k, d)) / math.sqrt(d)
    solution = (np.linalg.pinv(inputs) @ targets).T
    return RegressionProblem(*(torch.from_numpy(np.ascontiguousarray(a)).double()
                               for a in (inputs, targets, initial_weight, solution)))


def relative_weight_error(model: nn.Linear, reference: torch.Tensor, scale: torch.Tensor) -> Callable[[], float]:
    """``||W - reference||_F / ||scale||_F`` as a closure."""
    scale_norm = float(scale.norm())

    def error() -> float:
        with torch.no_grad():
            return float((model.weight - reference).norm()) / scale_norm

    return error


def gd_fixed_point(problem: RegressionProblem, alpha: float) -> torch.Tensor:
    """Where GD on ``1/2||X W^T - T||^2 + alpha/2||W||^2`` from the initial weight ends:
    the ridge solution ``T^T (X X^T + alpha I)^-1 X`` for alpha > 0; for alpha = 0 the
    min-norm solution plus the initial weight's component in the null space of X."""
    x, t, w0 = problem.inputs, problem.targets, problem.initial_weight
    if alpha > 0:
        gram = x @ x.T + alpha * torch.eye(x.shape[0], dtype=x.dtype)
        return torch.linalg.solve(gram, t).T @ x
    return problem.solution + w0 - w0 @ (torch.linalg.pinv(x) @ x)


def run_minnorm_regression(problem: RegressionProblem, seed: int, max_iterations: int, dual_c: float) -> RunResult:
    """Minnorm, equality form, full batch."""
    model = linear_model(problem.initial_weight, bias=False)
    optimizer = minnorm_optimizer(model, problem.inputs, problem.targets.shape[1], "equality", dual_c)
    example_ids = torch.arange(problem.inputs.shape[0])

    def step() -> None:
        optimizer.zero_grad()
        optimizer.lagrangian(model(problem.inputs), problem.targets, example_ids).backward()
        optimizer.step()

    error = relative_weight_error(model, problem.solution, problem.solution)
    return run_loop("Minnorm (equality)", "regression", seed, step, error, max_iterations)


def run_ridge_gd(problem: RegressionProblem, seed: int, max_iterations: int, alpha: float) -> RunResult:
    """GD on ``1/2 ||X W^T - T||^2 + alpha/2 ||W||^2`` with step ``1/L``,
    ``L = lambda_max(X^T X) + alpha``; ``alpha = 0`` is plain GD on the squared loss."""
    model = linear_model(problem.initial_weight, bias=False)
    # The L2 term's gradient alpha * W comes from SGD's weight_decay (the same update).
    optimizer = torch.optim.SGD(
        model.parameters(), lr=1.0 / (largest_eigenvalue(problem.inputs) + alpha), weight_decay=alpha
    )

    def step() -> None:
        optimizer.zero_grad()
        (0.5 * (model(problem.inputs) - problem.targets).pow(2).sum()).backward()
        optimizer.step()

    fixed_point = gd_fixed_point(problem, alpha)
    floor = float((fixed_point - problem.solution).norm() / problem.solution.norm())
    distance = relative_weight_error(model, fixed_point, problem.solution)
    name = "plain GD, squared loss" if alpha == 0 else f"L2-regularized GD, alpha={alpha:g}"
    error = relative_weight_error(model, problem.solution, problem.solution)
    return run_loop(
        name, "regression", seed, step, error, max_iterations,
        lower_bound=lambda: floor - distance(), floor=floor,
    )


def regression_runs(seed: int, max_iterations: int, dual_c: float) -> list[RunResult]:
    """Every method of claim 1 on one seed."""
    problem = regression_problem(seed)
    runs = [run_minnorm_regression(problem, seed, max_iterations, dual_c)]
    runs += [run_ridge_gd(problem, seed, max_iterations, alpha) for alpha in (*RIDGE_ALPHAS, 0.0)]
    return runs


# ---------------------------------------------------------------------------- claim 2
@dataclass
class MarginProblem:
    name: str
    inputs: torch.Tensor  # (n, d)
    labels: torch.Tensor  # (n,), 0/1 as float64
    initial_weight: torch.Tensor  # (1, d)
    svm_weight: torch.Tensor  # (d,)
    svm_bias: float
    svm_support: int
    svm_margin_violation: float


@dataclass
class SvmSummary:
    """What the report says about one SVM reference."""

    name: str
    support: int
    weight_norm: float
    margin_violation: float


def separable_data(rng: np.random.Generator, features: int, examples: int, gap: float) -> tuple[np.ndarray, np.ndarray]:
    """x ~ N(0, I_d); y = 1[u.x + TEACHER_OFFSET > 0] for a random unit u; points with
    ``|u.x + offset| < gap`` are redrawn. Both classes are guaranteed present."""
    while True:
        teacher = rng.standard_normal(features)
        teacher /= np.linalg.norm(teacher)
        rows: list[np.ndarray] = []
        while len(rows) < examples:
            candidate = rng.standard_normal(features)
            if abs(candidate @ teacher + TEACHER_OFFSET) >= gap:
                rows.append(candidate)
        inputs = np.stack(rows)
        labels = (inputs @ teacher + TEACHER_OFFSET > 0).astype(np.float64)
        if 0 < labels.sum() < examples:
            return inputs, labels


def svm_reference(inputs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float, int, float]:
    """Hard-margin SVM via ``SVC(kernel="linear", C=1e6, tol=1e-10)``.

    Returns the weight, the bias, the number of support vectors and the largest
    violation of ``s_i (w.x_i + b) >= 1`` (about 0 when C=1e6 acts as a hard margin).
    """
    from sklearn.svm import SVC

    svc = SVC(kernel="linear", C=1e6, tol=1e-10).fit(inputs, labels)
    weight = svc.coef_.ravel().astype(np.float64)
    bias = float(svc.intercept_[0])
    signs = 2 * labels - 1
    violation = float(np.max(np.maximum(0.0, 1.0 - signs * (inputs @ weight + bias))))
    return weight, bias, int(svc.support_.size), violation


def margin_problem(name: str, features: int, examples: int, gap: float, seed: int) -> MarginProblem:
    """Separable data, its SVM reference and an initial weight ~ N(0, 1/d)."""
    rng = np.random.default_rng([seed, features, examples])
    inputs, labels = separable_data(rng, features, examples, gap)
    initial_weight = rng.standard_normal((1, features)) / math.sqrt(features)
    weight, bias, support, violation = svm_reference(inputs, labels)
    as_tensor = torch.from_numpy
    return MarginProblem(
        name, as_tensor(inputs).double(), as_tensor(labels).double(), as_tensor(initial_weight).double(),
        as_tensor(weight).double(), bias, support, violation,
    )


def cosine_error(model: nn.Linear, svm_weight: torch.Tensor) -> Callable[[], float]:
    """``1 - cos(w, w_svm)`` as a closure (the bias is not part of the direction)."""
    reference = svm_weight / svm_weight.norm()

    def error() -> float:
        with torch.no_grad():
            weight = model.weight.reshape(-1)
            return float(1.0 - (weight @ reference) / weight.norm().clamp_min(1e-300))

    return error


def run_minnorm_margin(problem: MarginProblem, seed: int, max_iterations: int, dual_c: float) -> RunResult:
    """Minnorm, margin form with one output (the binary SVM form, labels 0/1)."""
    model = linear_model(problem.initial_weight, bias=True)
    optimizer = minnorm_optimizer(model, problem.inputs, 1, "margin", dual_c)
    example_ids = torch.arange(problem.inputs.shape[0])

    def step() -> None:
        optimizer.zero_grad()
        optimizer.lagrangian(model(problem.inputs), problem.labels, example_ids).backward()
        optimizer.step()

    error = cosine_error(model, problem.svm_weight)
    return run_loop("Minnorm (margin)", problem.name, seed, step, error, max_iterations)


def run_logistic_gd(problem: MarginProblem, seed: int, max_iterations: int) -> RunResult:
    """GD on the mean logistic loss, bias included, step ``1/L`` with
    ``L = lambda_max([X 1]^T [X 1]) / (4 n)``."""
    model = linear_model(problem.initial_weight, bias=True)
    n = problem.inputs.shape[0]
    augmented = torch.cat([problem.inputs, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=4 * n / largest_eigenvalue(augmented))
    targets = problem.labels.unsqueeze(1)

    def step() -> None:
        optimizer.zero_grad()
        F.binary_cross_entropy_with_logits(model(problem.inputs), targets).backward()
        optimizer.step()

    error = cosine_error(model, problem.svm_weight)
    return run_loop("GD, logistic loss", problem.name, seed, step, error, max_iterations)


def margin_runs(index: int, seed: int, max_iterations: int, dual_c: float) -> tuple[list[RunResult], SvmSummary]:
    """Both methods of claim 2 on ``MARGIN_PROBLEMS[index]`` for one seed."""
    name, features, examples, gap = MARGIN_PROBLEMS[index]
    problem = margin_problem(name, features, examples, gap, seed)
    runs = [run_minnorm_margin(problem, seed, max_iterations, dual_c), run_logistic_gd(problem, seed, max_iterations)]
    summary = SvmSummary(name, problem.svm_support, float(problem.svm_weight.norm()), problem.svm_margin_violation)
    return runs, summary


# ---------------------------------------------------------------------------- tasks
def run_task(task: tuple[str, int], max_iterations: int, dual_c: float, threads: int) -> tuple[list[RunResult], SvmSummary | None]:
    """One (problem, seed) task: ``("regression", seed)`` or ``("margin:<index>", seed)``."""
    torch.set_num_threads(threads)
    kind, seed = task
    if kind == "regression":
        return regression_runs(seed, max_iterations, dual_c), None
    return margin_runs(int(kind.split(":")[1]), seed, max_iterations, dual_c)


def all_tasks(seeds: int) -> list[tuple[str, int]]:
    kinds = ["regression"] + [f"margin:{index}" for index in range(len(MARGIN_PROBLEMS))]
    return [(kind, seed) for seed in range(seeds) for kind in kinds]


def run_all(args: argparse.Namespace) -> tuple[list[RunResult], list[SvmSummary]]:
    """Every task, in ``args.jobs`` single-threaded worker processes (or in-process)."""
    tasks = all_tasks(args.seeds)
    call = (args.max_iterations, args.dual_c, args.threads)
    if args.jobs == 1:
        outcomes = [run_task(task, *call) for task in tasks]
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
            futures = [pool.submit(run_task, task, *call) for task in tasks]
            outcomes = [future.result() for future in futures]
    runs = [run for task_runs, _ in outcomes for run in task_runs]
    summaries = [summary for _, summary in outcomes if summary is not None]
    return runs, summaries


# ---------------------------------------------------------------------------- report
def format_iterations(values: Sequence[int | None], budget: int) -> str:
    """Median [min, max] over seeds, or how many seeds did not get there."""
    reached = sorted(v for v in values if v is not None)
    if not reached:
        return f"not reached in {budget}"
    text = f"{int(np.median(reached))} [{reached[0]}, {reached[-1]}]" if len(reached) > 1 else str(reached[0])
    if len(reached) < len(values):
        text += f" ({len(values) - len(reached)}/{len(values)} seeds not reached in {budget})"
    return text


def format_spread(values: Sequence[float], fmt: str) -> str:
    """Median [min, max] of floats."""
    values = sorted(values)
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(float(np.median(values)), fmt)} [{format(values[0], fmt)}, {format(values[-1], fmt)}]"


def format_stops(group: Sequence[RunResult]) -> str:
    """Why the seeds' runs ended, with the median number of iterations run."""
    parts = []
    for reason in dict.fromkeys(r.stop_reason for r in group):
        runs = [r.iterations_run for r in group if r.stop_reason == reason]
        count = f"{len(runs)}x " if len(runs) < len(group) else ""
        parts.append(f"{count}{reason} ({int(np.median(runs))})")
    return ", ".join(parts)


def table_row(group: Sequence[RunResult]) -> list[str]:
    budget = group[0].max_iterations
    seconds = [r.seconds_to[1e-3] for r in group if r.seconds_to[1e-3] is not None]
    floors = [r.floor for r in group if r.floor is not None]
    return [
        group[0].problem,
        group[0].method,
        format_iterations([r.iterations_to[1e-3] for r in group], budget),
        format_iterations([r.iterations_to[1e-6] for r in group], budget),
        format_spread(seconds, ".3f") if seconds else "-",
        format_spread([1e3 * r.seconds_run / max(r.iterations_run, 1) for r in group], ".2f"),
        format_spread([r.final_error for r in group], ".1e"),
        format_stops(group),
        format_spread(floors, ".1e") if floors else "-",
    ]


def results_table(runs: Sequence[RunResult]) -> str:
    """Markdown table, one row per (problem, method), statistics over seeds."""
    lines = [
        "| problem | method | iters to 1e-3 | iters to 1e-6 | s to 1e-3 | ms / iter "
        "| error at stop | stopped (iters run) | fixed-point error |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for key in dict.fromkeys((r.problem, r.method) for r in runs):
        group = [r for r in runs if (r.problem, r.method) == key]
        lines.append("| " + " | ".join(table_row(group)) + " |")
    return "\n".join(lines)


def first_crossing_notes(runs: Sequence[RunResult]) -> str:
    """Runs whose first dip below a tolerance came well before they stayed below it."""
    lines = []
    for run in runs:
        for tol in TOLERANCES:
            first, stayed = run.first_crossing[tol], run.iterations_to[tol]
            if first is not None and (stayed is None or stayed > 2 * first + 10):
                stayed_text = "did not stay below" if stayed is None else f"stayed below from {stayed}"
                lines.append(
                    f"- {run.problem}, {run.method}, seed {run.seed}: first <= {tol:g} at iteration "
                    f"{first}, {stayed_text}"
                )
    return "\n".join(lines) if lines else "- none"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_header(argv: Sequence[str]) -> str:
    import sklearn

    command = " ".join(shlex.quote(part) for part in [sys.executable, *argv])
    return "\n".join(
        [
            "# Minnorm paper claims, linear models",
            "",
            f"- command: `{command}` (cwd {os.getcwd()})",
            f"- machine: {platform.platform()}, {cpu_model()}, "
            f"CPU count {os.cpu_count()}, load average {', '.join(f'{v:.2f}' for v in os.getloadavg())} at start",
            f"- versions: python {platform.python_version()}, torch {torch.__version__}, "
            f"numpy {np.__version__}, scikit-learn {sklearn.__version__}",
        ]
    )


def setup_description(args: argparse.Namespace) -> str:
    problems = "; ".join(
        f"{name}: n={n}, d={d}, gap {gap:g}" for name, d, n, gap in MARGIN_PROBLEMS
    )
    return "\n".join(
        [
            f"- seeds 0..{args.seeds - 1}, cells are median [min, max] over seeds; budget {args.max_iterations} "
            f"iterations per method and seed; full batch, float64, CPU; {args.jobs} worker process(es) "
            f"with {args.threads} torch thread(s) each.",
            f"- regression: n={REGRESSION_EXAMPLES}, d={REGRESSION_FEATURES}, {REGRESSION_TARGETS} targets, "
            "X ~ N(0,1)/sqrt(d), T ~ N(0,1), no bias, initial W ~ N(0, 1/d); "
            "error ||W - pinv(X) T||_F / ||pinv(X) T||_F.",
            f"- margin: x ~ N(0, I_d), y = 1[u.x + {TEACHER_OFFSET:g} > 0] for a random unit u, points with "
            f"|u.x + {TEACHER_OFFSET:g}| < gap redrawn; {problems}; bias included, initial w ~ N(0, 1/d), "
            "b = 0; error 1 - cos(w, w_svm), w_svm from SVC(kernel='linear', C=1e6, tol=1e-10).",
            f"- Minnorm: SGD lr=1.0 (weight and bias), dual_lr = {args.dual_c:g} / lambda_max(X X^T), "
            "damping = dual_lr, float64 multipliers, zero initial multipliers.",
            "- baselines, fixed step 1/L: ridge / plain GD on 1/2||XW^T-T||^2 + alpha/2||W||^2 "
            "(L = lambda_max(X^T X) + alpha); GD on the mean logistic loss (L = lambda_max([X 1]^T [X 1]) / 4n).",
            "- 'iters to tol': first iteration from which the error stayed <= tol until the run stopped "
            "(Minnorm's error is not monotone; early dips are listed below the table).",
            f"- a run stops at the budget; when 'converged' (error <= {CONVERGED_ERROR:g} for "
            f"{CONVERGED_WINDOW} iterations in a row); or 'at fixed point' (GD on a quadratic: fixed-point "
            "error minus distance to the fixed point, a bound on every later error, exceeds every tolerance).",
            "- 'fixed-point error': relative error of where the method converges (the ridge solution; for "
            "plain GD pinv(X) T plus the init's null-space component): the floor it cannot go below.",
            "- 's to 1e-3': wall time at the iteration counted in 'iters to 1e-3'; the error is evaluated "
            "after every step for every method and 'ms / iter' includes it.",
        ]
    )


def svm_notes(summaries: Sequence[SvmSummary]) -> str:
    lines = []
    for name in dict.fromkeys(s.name for s in summaries):
        group = [s for s in summaries if s.name == name]
        support = [s.support for s in group]
        norms = [s.weight_norm for s in group]
        lines.append(
            f"- SVM reference {name}: {min(support)}-{max(support)} support vectors, "
            f"||w_svm|| {min(norms):.3g}-{max(norms):.3g}, largest margin violation of the reference "
            f"{max(s.margin_violation for s in group):.1e}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Minnorm's linear paper claims vs their baselines.")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    parser.add_argument("--max-iterations", type=int, default=20_000, help="iteration budget per method (default 20000)")
    parser.add_argument("--dual-c", type=float, default=1.0, help="Minnorm dual_lr = c / lambda_max(X X^T) (default 1.0)")
    parser.add_argument(
        "--jobs", type=int, default=1,
        help="worker processes, one (problem, seed) task each at a time (default 1: steadier timings "
        "on a shared machine; 2 roughly halves the wall time on an idle 2-core machine)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    args = parser.parse_args(argv)
    if min(args.seeds, args.max_iterations, args.jobs, args.threads) < 1:
        parser.error("--seeds, --max-iterations, --jobs and --threads must be >= 1")
    if args.dual_c <= 0:
        parser.error("--dual-c must be > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    shown_argv = sys.argv if argv is None else [sys.argv[0], *argv]
    print(environment_header(shown_argv))
    print(setup_description(args), flush=True)
    started = time.perf_counter()
    runs, summaries = run_all(args)
    print(svm_notes(summaries))
    print()
    print(results_table(runs))
    print()
    print("Early dips (first iteration at or below a tolerance, long before the error stayed there):")
    print(first_crossing_notes(runs))
    print()
    print(f"total wall time {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
