"""The local learning coefficient by SGLD, essential dynamics and stage boundaries, checked where the answer
is known."""

import math

import numpy as np
import pytest
import torch

from model.llc import LLCConfig, calibrate, essential_dynamics, estimate_llc, largest_stable, stage_boundaries

D, N = 10, 10_000


@pytest.fixture(scope="module")
def regression():
    """Linear regression with D parameters at its least-squares solution: a regular model, LLC = D / 2."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=generator)
    y = x @ torch.randn(D, 1, generator=generator) + torch.randn(N, 1, generator=generator)
    model = torch.nn.Linear(D, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T)

    def loss(net, batch):  # the negative log-likelihood per sample of unit-variance Gaussian noise, up to a constant
        inputs, targets = batch
        return 0.5 * ((net(inputs) - targets) ** 2).mean()

    return model, loss, lambda generator: (x, y)


def test_a_regular_model_has_llc_half_its_dimension(regression):
    model, loss, batches = regression
    before = model.weight.detach().clone()
    estimate = estimate_llc(
        model, loss, batches, N, LLCConfig(epsilon=1e-4, gamma=1.0, chains=4, draws=2000, burn_in=500)
    )
    assert not estimate.diverged and estimate.warning is None
    # within 10% of D / 2, and within 3 of its own standard errors, which must themselves be small: an
    # estimator whose chains disagree wildly would pass the second bound alone (chains 4.7-5.4 here, error 0.14)
    assert abs(estimate.llc - D / 2) < 0.1 * D / 2 and estimate.std_error < 0.05 * D, (estimate.llc, estimate.std_error)
    assert abs(estimate.llc - D / 2) < 3 * estimate.std_error, (estimate.llc, estimate.std_error)
    assert estimate.settings["n_beta"] == pytest.approx(N / math.log(N)) and estimate.settings["chains"] == 4
    assert len(estimate.traces) == 4 and all(len(trace) == 2500 for trace in estimate.traces)
    assert torch.equal(model.weight, before)  # the weights the chains started from are given back


def test_estimates_are_reproducible_and_leave_the_training_rng_alone(regression):
    model, loss, batches = regression
    torch.manual_seed(123)
    state = torch.get_rng_state()
    config = LLCConfig(epsilon=1e-4, gamma=1.0, chains=2, draws=100, burn_in=20, seed=7)
    first = estimate_llc(model, loss, batches, N, config)
    assert torch.equal(torch.get_rng_state(), state)
    second = estimate_llc(model, loss, batches, N, config)
    assert first.chain_llcs == second.chain_llcs and first.traces == second.traces
    other = estimate_llc(
        model, loss, batches, N, LLCConfig(epsilon=1e-4, gamma=1.0, chains=2, draws=100, burn_in=20, seed=8)
    )
    assert other.chain_llcs != first.chain_llcs


def test_too_large_a_step_is_flagged_as_divergent_not_averaged_into_a_number(regression):
    model, loss, batches = regression
    estimate = estimate_llc(model, loss, batches, N, LLCConfig(epsilon=1.0, gamma=1.0, chains=3, draws=50, burn_in=10))
    assert estimate.llc is None and estimate.diverged == [0, 1, 2]
    assert (
        estimate.warning.startswith("3 of 3 SGLD chains diverged (eps 1.0, gamma 1.0)") and "\n" not in estimate.warning
    )
    partly = estimate_llc(model, loss, batches, N, LLCConfig(epsilon=1e-4, gamma=1.0, chains=2, draws=50, burn_in=10))
    assert partly.diverged == [] and partly.llc is not None


def test_calibration_prefers_the_largest_step_whose_estimate_no_longer_depends_on_it(regression):
    model, loss, batches = regression
    rows = calibrate(
        model,
        loss,
        batches,
        N,
        epsilons=(3e-5, 1e-4, 3e-4, 1.0),
        gammas=(1.0,),
        config=LLCConfig(chains=2, draws=400, burn_in=100),
    )
    by_epsilon = {row["epsilon"]: row for row in rows}
    assert by_epsilon[1.0]["diverged"] == 2 and not by_epsilon[1.0]["stable"]
    assert by_epsilon[1e-4]["stable"] and by_epsilon[1e-4]["agrees_with_smaller_eps"]
    assert by_epsilon[3e-4]["stable"]  # two stable steps: the pick is the largest, not any stable one
    assert largest_stable(rows)["epsilon"] == 3e-4
    assert largest_stable([row | {"stable": False} for row in rows]) is None


def test_stage_boundaries_are_the_critical_points_of_the_curve_over_log_tokens():
    tokens = [2**k for k in range(1, 21)]
    # flat at 40, a jump to 120 between 2^9 and 2^11 (an induction bump), flat again, then a fall from 2^16
    curve = [40.0 if k <= 9 else 80.0 if k == 10 else 120.0 if k < 16 else 120.0 - 25 * (k - 15) for k in range(1, 21)]
    curve[4] += 3.0  # one noisy estimate on the first plateau: no stage of its own
    boundaries = stage_boundaries(tokens, curve)
    assert [b["kind"] for b in boundaries] == ["plateau", "rising", "plateau"]
    assert boundaries[1]["tokens"] == boundaries[1]["start"] == 2**10  # the jump's middle snapshot
    assert boundaries[2]["tokens"] == 2**15  # the last snapshot before the fall (a stage that never ends)
    assert stage_boundaries(tokens, [5.0] * 20) == []  # a curve that never changes has one stage
    assert stage_boundaries(tokens, [50.0 + 0.5 * k for k in range(20)]) == []  # a slow drift is no stage
    assert stage_boundaries(tokens[:3], curve[:3]) == []


def test_essential_dynamics_finds_exactly_the_turns_of_a_trajectory_and_not_its_wiggles():
    """Outputs moving along four directions in turn, each corner a reversal of more than 90 degrees, in a 40-wide
    space with noise in four more dimensions (rank 8), then a wiggle of late, slow training: the turning points
    are the three corners and nothing else."""
    generator = np.random.default_rng(0)
    steps = [np.array(v, dtype=float) for v in ([10, 0, 0, 0], [-6, 8, 0, 0], [0, -8, 6, 0], [0, 0, -8, 6])]
    points = [np.zeros(4)]
    for step in steps:
        points += [points[-1] + step * k for k in range(1, 7)]
    points += [points[-1] + np.array([0, 0, 0, (-1.0) ** k]) * (k % 2) for k in range(6)]
    basis = np.linalg.qr(generator.normal(size=(40, 40)))[0][:, :8]
    outputs = [basis @ np.concatenate([p, generator.normal(0, 0.3, 4)]) for p in points]
    result = essential_dynamics(outputs)
    assert len(result["trajectory"]) == len(points) == 31 and len(result["trajectory"][0]) == 3
    assert result["turning_points"] == [6, 12, 18]
    # the explained variance is each component's share of all the variance (rank 8), not of the three kept
    centred = np.stack(outputs) - np.stack(outputs).mean(0)
    singular = np.linalg.svd(centred, compute_uv=False)
    assert result["explained_variance"] == pytest.approx((singular[:3] ** 2 / (singular**2).sum()).tolist())
    assert sum(result["explained_variance"]) < 0.99
    # a trajectory that only drifts and wiggles has no turn
    drift = [basis @ np.concatenate([[k, 0.3 * (-1) ** k, 0, 0], generator.normal(0, 0.3, 4)]) for k in range(20)]
    assert essential_dynamics(drift)["turning_points"] == []
