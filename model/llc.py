"""The local learning coefficient (LLC) of a model at its weights w0, by SGLD (Lau et al. 2023).

Chains start at w0 and follow

    w' = w - (eps / 2) (n_beta * grad L_batch(w) + gamma (w - w0)) + N(0, eps)

(gamma keeps them near w0; n_beta is the inverse temperature times the sample size). After
a burn-in, the chains' batch losses estimate E[L(w)] under the localized tempered posterior,
and LLC = n_beta (E[L(w)] - L(w0)), with L(w0) measured over several batches. For a regular
model with d parameters the LLC is d / 2; a degenerate one has less (Watanabe). Each chain's
estimate is kept, and its loss trace; a chain whose loss goes non-finite or runs away from
L(w0) is reported as diverged, never averaged in. Batches and noise come from a private
torch.Generator: the caller's (training's) random state is left as it was.

Stage boundaries (Hoogland et al. 2024) are critical points of the LLC over log tokens:
`stage_boundaries` finds them in a smoothed curve, and the same on the essential-dynamics
trajectory (`essential_dynamics`: PCA of the model's outputs on a fixed probe batch across
snapshots).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch

Batch = Any
LossFunction = Callable[[torch.nn.Module, Batch], torch.Tensor]


@dataclass(frozen=True)
class LLCConfig:
    """SGLD settings of an LLC estimate; recorded with every estimate, fixed across an experiment so trials compare."""

    epsilon: float = 1e-3
    """Step size eps (the noise's variance too)."""
    gamma: float = 100.0
    """Localization strength: the pull back towards w0."""
    n_beta: float | None = None
    """Inverse temperature times sample size; None: n / ln(n) with n the tokens (or samples) of one batch."""
    chains: int = 2
    draws: int = 60
    """Losses recorded per chain after the burn-in."""
    burn_in: int = 40
    batch_size: int = 32
    """Windows (or samples) per SGLD step."""
    init_batches: int = 8
    """Batches L(w0) is averaged over."""
    seed: int = 0
    divergence_factor: float = 10.0
    """A chain diverges when its loss goes non-finite or past L(w0) + divergence_factor * (|L(w0)| + 1)."""

    def resolved_n_beta(self, samples_per_batch: int) -> float:
        if self.n_beta is not None:
            return self.n_beta
        n = max(samples_per_batch, 3)
        return n / math.log(n)


@dataclass
class LLCEstimate:
    """One estimate: the mean over the chains that did not diverge, its standard error, and everything behind it."""

    llc: float | None
    """None when every chain diverged."""
    std_error: float | None
    chain_llcs: list[float | None]
    """None for a diverged chain."""
    init_loss: float
    traces: list[list[float]]
    """Every chain's batch losses, burn-in included (it shows whether the chain rose, then settled)."""
    diverged: list[int] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def warning(self) -> str | None:
        if not self.diverged:
            return None
        return (
            f"{len(self.diverged)} of {len(self.chain_llcs)} SGLD chains diverged (eps {self.settings['epsilon']}, "
            f"gamma {self.settings['gamma']}); lower --llc-epsilon or raise --llc-gamma"
        )


def estimate_llc(
    model: torch.nn.Module,
    loss: LossFunction,
    sample_batch: Callable[[torch.Generator], Batch],
    samples_per_batch: int,
    config: LLCConfig = LLCConfig(),
) -> LLCEstimate:
    """The LLC of `model` at its current weights (left unchanged).

    `loss(model, batch)` is the mean loss of a batch (per token or per sample); `sample_batch(generator)`
    draws one with the private generator; `samples_per_batch` is n for the default n_beta.
    """
    n_beta = config.resolved_n_beta(samples_per_batch)
    parameters = [p for p in model.parameters() if p.requires_grad]
    w0 = [p.detach().clone() for p in parameters]
    generator = torch.Generator().manual_seed(config.seed)
    was_training, grad_was_enabled = model.training, torch.is_grad_enabled()
    model.eval()
    with torch.no_grad():
        init_loss = float(np.mean([float(loss(model, sample_batch(generator))) for _ in range(config.init_batches)]))
    limit = init_loss + config.divergence_factor * (abs(init_loss) + 1.0)
    chain_llcs: list[float | None] = []
    traces: list[list[float]] = []
    diverged = []
    noise_std = math.sqrt(config.epsilon)
    try:
        torch.set_grad_enabled(True)  # callers may measure under no_grad; SGLD needs the gradients
        for chain in range(config.chains):
            trace: list[float] = []
            for parameter, start in zip(parameters, w0):
                parameter.data.copy_(start)
            for _ in range(config.burn_in + config.draws):
                batch_loss = loss(model, sample_batch(generator))
                value = float(batch_loss.detach())
                trace.append(value)
                if not math.isfinite(value) or value > limit:
                    break
                gradients = torch.autograd.grad(batch_loss, parameters)
                with torch.no_grad():
                    for parameter, gradient, start in zip(parameters, gradients, w0):
                        drift = n_beta * gradient + config.gamma * (parameter - start)
                        noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * noise_std
                        parameter.add_(-0.5 * config.epsilon * drift + noise.to(parameter.device))
            traces.append(trace)
            if len(trace) < config.burn_in + config.draws or not math.isfinite(trace[-1]):
                diverged.append(chain)
                chain_llcs.append(None)
            else:
                chain_llcs.append(n_beta * (float(np.mean(trace[config.burn_in :])) - init_loss))
    finally:
        torch.set_grad_enabled(grad_was_enabled)
        with torch.no_grad():
            for parameter, start in zip(parameters, w0):
                parameter.copy_(start)
        model.train(was_training)
    finite = [value for value in chain_llcs if value is not None]
    llc = float(np.mean(finite)) if finite else None
    std_error = float(np.std(finite, ddof=1) / math.sqrt(len(finite))) if len(finite) > 1 else None
    settings = asdict(config) | {"n_beta": n_beta, "samples_per_batch": samples_per_batch}
    return LLCEstimate(llc, std_error, chain_llcs, init_loss, traces, diverged, settings)


def calibrate(
    model: torch.nn.Module,
    loss: LossFunction,
    sample_batch: Callable[[torch.Generator], Batch],
    samples_per_batch: int,
    epsilons: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2),
    gammas: tuple[float, ...] = (10.0, 100.0, 1000.0),
    config: LLCConfig = LLCConfig(),
) -> list[dict[str, Any]]:
    """An estimate for every (eps, gamma), each judged as devinterp advises: stable when no chain diverged, the
    trace settles above L(w0) (its last half's mean above L(w0) and within 20% of its second quarter's), and the
    estimate stops depending on eps (within 20% of the next smaller eps). The largest stable eps is the pick."""
    rows = []
    for gamma in gammas:
        previous = None
        for epsilon in sorted(epsilons):
            estimate = estimate_llc(
                model, loss, sample_batch, samples_per_batch, replace(config, epsilon=epsilon, gamma=gamma)
            )
            settled = all(_settled(trace, estimate.init_loss) for trace in estimate.traces) and not estimate.diverged
            agrees = (
                previous is not None
                and estimate.llc is not None
                and previous.llc is not None
                and abs(estimate.llc - previous.llc) <= 0.2 * max(abs(previous.llc), 1e-9)
            )
            rows.append(
                {
                    "epsilon": epsilon,
                    "gamma": gamma,
                    "llc": estimate.llc,
                    "std_error": estimate.std_error,
                    "chains": [value for value in estimate.chain_llcs if value is not None],
                    "diverged": len(estimate.diverged),
                    "settled": settled,
                    "agrees_with_smaller_eps": agrees,
                    "stable": settled and (agrees or previous is None),
                }
            )
            previous = estimate
    return rows


def largest_stable(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The setting calibration picks: the largest stable eps (at the smallest gamma among its ties); None when no
    setting is stable."""
    stable = [row for row in rows if row["stable"]]
    return max(stable, key=lambda row: (row["epsilon"], -row["gamma"])) if stable else None


def _settled(trace: list[float], init_loss: float) -> bool:
    if len(trace) < 8:
        return False
    half, quarter = trace[len(trace) // 2 :], trace[len(trace) // 4 : len(trace) // 2]
    late, middle = float(np.mean(half)), float(np.mean(quarter))
    return late > init_loss and abs(late - middle) <= 0.2 * max(abs(middle - init_loss), 1e-9) + 1e-12


# ---------------------------------------------------------------- stages


def smooth(values: np.ndarray, width: int = 3) -> np.ndarray:
    """A running median: single noisy estimates go, the edges of a real jump stay where they are."""
    if len(values) < width or width < 2:
        return values.astype(float)
    half = width // 2
    padded = np.pad(values.astype(float), half, mode="edge")
    return np.array([np.median(padded[i : i + width]) for i in range(len(values))])


def stage_boundaries(tokens: list[int], values: list[float], flat: float = 0.5) -> list[dict[str, Any]]:
    """Critical points of `values` (an LLC curve) over log tokens (Hoogland et al. 2024): the curve, smoothed by a
    running median, is on a plateau where it changes by less than `flat` times its mean level per e-fold of tokens
    (|dLLC / d ln t| < flat * mean |LLC|), and rising or falling elsewhere; a boundary is where that changes.
    Each boundary closes the stage before it, labelled by what the curve did through that stage.

    Returns [{"tokens": the stage's last snapshot, "kind": "rising"|"falling"|"plateau", "start": its first}, ...].
    """
    points = [(t, v) for t, v in zip(tokens, values) if t > 0 and v is not None and math.isfinite(v)]
    if len(points) < 4:
        return []
    x = np.log(np.array([t for t, _ in points], dtype=float))
    y = smooth(np.array([v for _, v in points], dtype=float))
    level = float(np.mean(np.abs(y)))
    if float(np.ptp(y)) <= 1e-9 * (1.0 + level):
        return []  # a curve that does not change has one stage
    slope = np.gradient(y, x) / max(level, 1e-12)
    state = np.where(np.abs(slope) < flat, 0, np.sign(slope)).astype(int)  # 1 rising, -1 falling, 0 plateau
    boundaries = []
    start = 0
    for index in range(1, len(state)):
        if state[index] != state[index - 1]:
            kind = {1: "rising", -1: "falling", 0: "plateau"}[int(state[index - 1])]
            boundaries.append({"tokens": int(points[index - 1][0]), "kind": kind, "start": int(points[start][0])})
            start = index
    return boundaries


def essential_dynamics(outputs: list[np.ndarray], components: int = 3) -> dict[str, Any]:
    """PCA of the model's outputs (flattened log-probs on a fixed probe batch) across snapshots: the trajectory
    in the first `components` principal components, their explained variance, and its turning points
    (`turning_points`)."""
    matrix = np.stack([o.reshape(-1) for o in outputs]).astype(np.float64)  # (snapshots, features)
    centred = matrix - matrix.mean(0, keepdims=True)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(components, len(singular))
    trajectory = centred @ vt[:k].T  # (snapshots, k)
    explained = (singular[:k] ** 2 / max(float((singular**2).sum()), 1e-30)).tolist()
    return {"trajectory": trajectory.tolist(), "explained_variance": explained,
            "turning_points": turning_points(trajectory)}


TURN_SCALE = 0.15
"""A turn is read at the scale of this share of the trajectory's extent: smaller wiggles are noise."""


def turning_points(trajectory: np.ndarray, scale: float = TURN_SCALE) -> list[int]:
    """Snapshots where the trajectory reverses: the way it came and the way it goes point more than 90 degrees
    apart, each measured over the fewest snapshots that move it `scale` of its extent (the largest distance
    between two of its points), so that a wiggle of late, slow training is no turn and a cusp spread over a few
    snapshots is one. Of neighbouring candidates the sharpest is kept."""
    points = np.asarray(trajectory, dtype=np.float64)
    count = len(points)
    if count < 3:
        return []
    extent = float(np.max(np.linalg.norm(points[:, None] - points[None], axis=-1)))
    reach = scale * extent
    if reach <= 0:
        return []

    def displacement(index: int, direction: int) -> np.ndarray | None:
        for other in range(index + direction, -1 if direction < 0 else count, direction):
            step = points[other] - points[index]
            if np.linalg.norm(step) >= reach:
                return step
        return None

    cosines = {}
    for index in range(1, count - 1):
        before, after = displacement(index, -1), displacement(index, 1)
        if before is not None and after is not None:
            cosine = float(-before @ after / (np.linalg.norm(before) * np.linalg.norm(after)))  # came in as -before
            if cosine < 0:
                cosines[index] = cosine
    runs: list[list[int]] = []  # neighbouring candidates are one turn: the sharpest of them
    for index in sorted(cosines):
        if runs and index - runs[-1][-1] == 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return [min(run, key=cosines.get) for run in runs]


@torch.no_grad()
def output_features(model: torch.nn.Module, windows: torch.Tensor, dims: int = 256, seed: int = 0) -> np.ndarray:
    """The model's log-probabilities on a fixed probe batch (windows [B, T+1]), flattened: the point of one snapshot
    in essential dynamics. Vocabularies wider than `dims` are projected by a fixed Gaussian matrix (distances, and
    so the PCA, are kept up to a small distortion)."""
    model.eval()
    device = next(model.parameters()).device
    log_probs = torch.log_softmax(model(windows[:, :-1].long().to(device)).float(), dim=-1)  # (B, T, vocab)
    vocab = log_probs.shape[-1]
    if vocab > dims:
        projection = torch.randn(vocab, dims, generator=torch.Generator().manual_seed(seed)) / math.sqrt(dims)
        log_probs = log_probs @ projection.to(device)
    return log_probs.reshape(-1).cpu().numpy()
