"""The random samplers choose uniformly: a chi-square test of how often each free entry is chosen.

Every sampler that grows or initializes a topology is drawn many times at a fixed seed (so the
test is deterministic), counting how often each entry is chosen. Choosing ``k`` of ``m`` free
entries uniformly, an entry's count over ``T`` draws has mean ``T k / m`` and variance
``T p (1 - p)`` (``p = k / m``); the counts sum to ``T k``, so the sum of the squared standardized
deviations, times ``(m - 1) / m``, is chi-square with ``m - 1`` degrees of freedom. The limit is
its 99.9th percentile. A sampler with a modest bias (one that a wrong modulo or an off-by-one in
a rejection loop would give) exceeds that limit: the end of the file shows it.
"""
from __future__ import annotations

import math

import pytest
import torch

from dynsparse.sparse import draws
from dynsparse.sparse.draws import choose_random, choose_random_among_free, random_mask, ranked_draws, sample_flat
from dynsparse.sparse.layers import csr_functions as csr_ops

N = 64
TAKEN = torch.arange(0, N, 4)  # every 4th entry is active: 48 free ones, spread over the range
FREE = torch.ones(N, dtype=torch.bool)
FREE[TAKEN] = False
M = int(FREE.sum())


def chi_square(counts: torch.Tensor, trials: int, k: int) -> float:
    """The statistic over the free entries (``counts`` of the taken ones must be 0)."""
    assert int(counts[TAKEN].sum()) == 0, "a taken entry was chosen"
    c = counts[FREE].double()
    m = c.numel()
    p = k / m
    assert int(c.sum()) == trials * k, "a draw returned a wrong number of distinct entries"
    return float(((c - trials * p) ** 2).sum() / (trials * p * (1 - p)) * (m - 1) / m)


def limit(df: int, z: float = 3.09) -> float:
    """The chi-square 99.9th percentile (Wilson-Hilferty: within 1% at these df)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def counts_of(draw, trials: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    counts = torch.zeros(N, dtype=torch.int64)
    for _ in range(trials):
        idx = draw(k, g)
        assert idx.unique().numel() == k  # without replacement
        counts[idx] += 1
    return counts


def ranked(k, g):
    idx, rank = ranked_draws(N, k, M, g, torch.device("cpu"), lambda i: FREE[i], lambda: FREE)
    return idx[(rank >= 1) & (rank <= k)]


SAMPLERS = {
    "choose_random": lambda k, g: choose_random(FREE, k, g, num_candidates=M),
    "choose_random_among_free": lambda k, g: choose_random_among_free(N, TAKEN, k, g, M),
    "ranked_draws": ranked,
    "choose_random_among_free lean": lambda k, g: choose_random_among_free(N, TAKEN, k, g, lean=True),
    "sample_flat (CSRWeight)": lambda k, g: sample_flat(N, k, g, exclude=TAKEN),
}
# k = 2 of 48: the rejection paths (few from many); k = 20: the dense paths (scores, top-k or a permutation)
REGIMES = [(2, 1500), (20, 200)]


def test_one_sampler_for_both_storages():
    """The CSR kernels' sampler is draws.py's (one implementation), and its lean mode returns the
    sorted distinct free entries."""
    assert csr_ops.sample_flat is draws.sample_flat
    g = torch.Generator().manual_seed(3)
    s = choose_random_among_free(N, TAKEN, 40, g, lean=True)
    assert torch.equal(s, torch.sort(s).values) and s.unique().numel() == 40 and bool(FREE[s].all())


@pytest.mark.parametrize("k,trials", REGIMES, ids=["few", "many"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_each_free_entry_is_chosen_equally_often(name, k, trials):
    stat = chi_square(counts_of(SAMPLERS[name], trials, k), trials, k)
    assert stat < limit(M - 1), f"{name}: chi-square {stat:.1f} over the limit {limit(M - 1):.1f}"


def test_initial_masks_are_uniform():
    g = torch.Generator().manual_seed(99)
    counts = torch.zeros(N, dtype=torch.int64)
    trials, density = 400, 0.25
    for _ in range(trials):
        mask, active = random_mask(torch.Size([8, 8]), density, g, torch.device("cpu"))
        assert active == int(mask.sum()) == 16
        counts += mask.reshape(-1).long()
    p = density
    stat = float(((counts.double() - trials * p) ** 2).sum() / (trials * p * (1 - p)) * (N - 1) / N)
    assert stat < limit(N - 1)


# ---- the test can fail: slightly biased samplers ------------------------------------------------

def modulo_biased(k, g):
    """Draws from a range 25% too wide folded back by modulo: the first free entries come up twice as
    often (a classic bug), rejection of taken entries and repeats otherwise as the real samplers."""
    out: list[int] = []
    while len(out) < k:
        i = int(torch.randint(N + N // 4, (1,), generator=g)) % N
        if FREE[i] and i not in out:
            out.append(i)
    return torch.tensor(out)


def off_by_one(k, g):
    """A rejection sampler whose range misses the last entry (``randint(N - 1)``)."""
    out: list[int] = []
    while len(out) < k:
        i = int(torch.randint(N - 1, (1,), generator=g))
        if FREE[i] and i not in out:
            out.append(i)
    return torch.tensor(out)


@pytest.mark.parametrize("biased", [modulo_biased, off_by_one])
def test_a_biased_sampler_fails_the_same_test(biased):
    k, trials = REGIMES[0]
    stat = chi_square(counts_of(biased, trials, k), trials, k)
    assert stat > limit(M - 1), f"{biased.__name__}: chi-square {stat:.1f} would pass"
