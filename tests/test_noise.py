"""The per-sample noise generator (pdscli.noise): its definition, its independence of the batch
and the thread count, one computation per draw, and its statistics.

Statistical tolerances are k standard errors of the statistic at the sample size used (k = 5 or
6, so that a correct generator fails with probability well below 1e-5 per check); the inputs are
fixed, so every check is deterministic.
"""

from __future__ import annotations

import math

import pytest
import torch

from pdscli import noise as noise_module
from pdscli.noise import MASK32, NOISE_VERSION, SampleNoise, philox4x32, sample_seed

SHAPE = (3, 8, 8)


# -- the definition ---------------------------------------------------------------------------


def _philox_ints(ctr, key, rounds=10):
    """Philox4x32 on plain Python ints, written from the paper's round function."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & MASK32, (k1 + 0xBB67AE85) & MASK32
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & MASK32, p1 & MASK32, ((p0 >> 32) ^ c3 ^ k1) & MASK32, p0 & MASK32
    return c0, c1, c2, c3


def _element(seed, index, draw, e):
    """Element e of draw `draw` of sample `index`, from the module docstring's definition."""
    words = _philox_ints((e // 4, draw, index & MASK32, index >> 32), (seed & MASK32, seed >> 32))
    pair = (words[0], words[1]) if e % 4 < 2 else (words[2], words[3])
    u = (pair[0] + 0.5) * 2.0**-32
    theta = 2.0 * math.pi * (pair[1] + 0.5) * 2.0**-32
    r = math.sqrt(-2.0 * math.log(u))
    return r * (math.cos(theta) if e % 2 == 0 else math.sin(theta))


# Random123's published known-answer vectors for Philox4x32-10 (its tests/kat_vectors).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK32,) * 4, (MASK32,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_matches_the_known_answers(ctr, key, expected):
    got = philox4x32(*(torch.tensor([c], dtype=torch.int64) for c in ctr), key)
    assert tuple(int(w) for w in got) == expected
    assert _philox_ints(ctr, key) == expected  # the test's own reference agrees too


def test_philox_tensor_words_equal_the_integer_definition_on_random_counters():
    g = torch.Generator().manual_seed(0)
    ctr = torch.randint(0, 2**32, (4, 200), generator=g, dtype=torch.int64)
    key = (0xDEADBEEF, 0x01234567)
    got = torch.stack(philox4x32(*ctr, key))
    for j in range(0, 200, 7):
        assert tuple(int(w) for w in got[:, j]) == _philox_ints(tuple(int(c) for c in ctr[:, j]), key)


def test_noise_elements_follow_the_definition():
    seed, indices = 123456789012, [0, 7, 2**32 + 5]
    noise = SampleNoise(seed, indices, SHAPE)
    draws = [noise() for _ in range(3)]
    n = math.prod(SHAPE)
    for d, z in enumerate(draws):
        flat = z.reshape(len(indices), n)
        for b, index in enumerate(indices):
            for e in (0, 1, 2, 3, 4, 101, n - 1):
                want = torch.tensor(_element(seed, index, d, e), dtype=torch.float64).float()
                # float32 of the same float64 number; math.log and torch.log may differ in the
                # last float64 bit, which float32 rounding almost never sees: allow one float32 step.
                assert abs(float(flat[b, e]) - float(want)) <= 1.2e-7 * max(1.0, abs(float(want))), (d, index, e)


def test_noise_version_is_recorded_as_an_int():
    assert isinstance(NOISE_VERSION, int) and NOISE_VERSION >= 2


# -- independence of the batch, the order and the threads ---------------------------------------


def _draws(seed, indices, shape=SHAPE, count=3):
    noise = SampleNoise(seed, indices, shape)
    return [noise() for _ in range(count)]


def test_image_i_is_bit_identical_across_batch_sizes_1_3_8_and_orders():
    seed = 11
    alone = {i: _draws(seed, [i]) for i in range(8)}
    for indices in (range(3), range(8), [5, 2, 7], [7, 6, 5, 4, 3, 2, 1, 0]):
        together = _draws(seed, list(indices))
        for b, i in enumerate(indices):
            for d in range(3):
                assert torch.equal(together[d][b], alone[i][d][0]), (list(indices), i, d)


def test_image_i_is_bit_identical_across_thread_counts():
    shape = (3, 96, 96)  # [8, 6912] counters: large enough for torch to split the work over threads
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(_draws(5, range(8), shape, count=2))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_rebind_replays_the_draws_of_fresh_noise():
    noise = SampleNoise(3, [0, 1, 2], SHAPE)
    for _ in range(4):
        noise()
    noise.rebind([9, 4, 100])
    fresh = SampleNoise(3, [9, 4, 100], SHAPE)
    for _ in range(3):
        assert torch.equal(noise(), fresh())
    with pytest.raises(ValueError):
        noise.rebind([1])


def test_a_draw_for_b_samples_is_one_hash_call(monkeypatch):
    calls = []
    real = noise_module.philox4x32

    def counting(*args, **kwargs):
        calls.append(args[2].shape[0])  # the rows the call covers
        return real(*args, **kwargs)

    monkeypatch.setattr(noise_module, "philox4x32", counting)
    noise = SampleNoise(0, range(8), SHAPE)
    for _ in range(3):
        z = noise()
    assert z.shape == (8, *SHAPE) and z.dtype == torch.float32
    assert calls == [8, 8, 8]  # one call per draw, covering all 8 samples


def test_sample_seed_still_makes_distinct_generator_seeds():
    # train/loop.py seeds a torch.Generator per training step with it.
    seeds = {sample_seed(0, i) for i in range(100)} | {sample_seed(1, i) for i in range(100)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)


# -- statistics -------------------------------------------------------------------------------

B, STAT_SHAPE = 64, (1, 32, 32)  # 65536 numbers per draw
N = B * math.prod(STAT_SHAPE)


@pytest.fixture(scope="module")
def draws():
    noise = SampleNoise(2024, range(B), STAT_SHAPE)
    return torch.stack([noise().double().reshape(B, -1) for _ in range(4)])  # [draw, sample, element]


def test_moments(draws):
    z = draws.reshape(-1)
    n = z.numel()
    k = 6
    assert abs(float(z.mean())) < k / math.sqrt(n)
    assert abs(float(z.var()) - 1) < k * math.sqrt(2 / n)
    assert abs(float((z**3).mean())) < k * math.sqrt(15 / n)  # skewness; Var z^3 = 15
    assert abs(float((z**4).mean()) - 3) < k * math.sqrt(96 / n)  # kurtosis; Var z^4 = 105 - 9
    assert bool(torch.isfinite(z).all()) and float(z.abs().max()) < 6.7  # Box–Muller from 32-bit words


def test_distribution_is_normal_by_kolmogorov_smirnov(draws):
    z, _ = draws.reshape(-1).sort()
    n = z.numel()
    cdf = torch.special.ndtr(z)
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n
    d = float(torch.maximum(upper - cdf, cdf - (upper - 1 / n)).max())
    # P(sqrt(n) D > t) ~ 2 exp(-2 t^2): t = 2.8 puts a correct generator's failure below 1e-6.
    assert d < 2.8 / math.sqrt(n), d
    # and the mass within one sigma, a binomial proportion
    p = 0.6826894921370859
    inside = float((z.abs() < 1).double().mean())
    assert abs(inside - p) < 6 * math.sqrt(p * (1 - p) / n)


def _corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of the last dimension (pairs along it)."""
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / torch.sqrt((a * a).sum(-1) * (b * b).sum(-1))


def test_no_correlation_between_samples(draws):
    rows = draws[0]  # [B, 1024]: every pair of samples, same draw
    n = rows.shape[1]
    r = _corr(rows[:, None, :], rows[None, :, :])
    off = r[~torch.eye(B, dtype=torch.bool)]
    # B(B-1) = 4032 pairs (each twice): max |r| under 6 standard errors, and the mean of r^2 at 1/n
    assert float(off.abs().max()) < 6 / math.sqrt(n)
    assert abs(float((off**2).mean()) * n - 1) < 6 * math.sqrt(2 / (B * (B - 1) / 2))


def test_no_correlation_between_draws(draws):
    n = draws.shape[-1]
    for d in range(draws.shape[0] - 1):
        r = _corr(draws[d], draws[d + 1])  # per sample, consecutive draws (a PC step's two draws)
        assert float(r.abs().max()) < 6 / math.sqrt(n)
    whole = _corr(draws[0].reshape(-1), draws[3].reshape(-1))
    assert abs(float(whole)) < 6 / math.sqrt(N)


@pytest.mark.parametrize("lag", [1, 2, 3, 4, 5, 32])
def test_no_correlation_between_neighbouring_elements(draws, lag):
    # Lags 1-3 pair numbers from one Philox counter (and lag 1 often one Box–Muller pair);
    # lag 4 the same position in neighbouring counters; 32 the pixel below (32 wide).
    z = draws.reshape(-1, draws.shape[-1])
    r = _corr(z[:, :-lag].reshape(-1), z[:, lag:].reshape(-1))
    assert abs(float(r)) < 6 / math.sqrt(z[:, lag:].numel())


def test_box_muller_pairs_are_uncorrelated_in_their_squares(draws):
    # z0 and z1 of one pair share the radius: independent only if Box–Muller is done right, and
    # then their squares are uncorrelated too (a shared-radius bug shows here, not in the means).
    z = draws.reshape(-1, 4)
    for a, b in ((0, 1), (2, 3), (0, 2)):
        r = _corr(z[:, a] ** 2, z[:, b] ** 2)
        assert abs(float(r)) < 6 / math.sqrt(z.shape[0])


def test_other_seeds_and_high_index_words_give_unrelated_streams():
    n = math.prod(STAT_SHAPE)
    a = SampleNoise(1, [5], STAT_SHAPE)().reshape(-1).double()
    for other in (SampleNoise(2, [5], STAT_SHAPE), SampleNoise(1 + 2**32, [5], STAT_SHAPE), SampleNoise(1, [5 + 2**32], STAT_SHAPE)):
        b = other().reshape(-1).double()
        assert not torch.equal(a, b)
        assert abs(float(_corr(a, b))) < 6 / math.sqrt(n)


# -- the run records the version and --resume checks it -------------------------------------------


def test_run_records_the_noise_version_and_resume_refuses_another(run_pds, tmp_path):
    import json

    out = tmp_path / "run"
    args = ("sample", "--model", "gaussian", "--image-size", "8", "--steps", "3", "--quiet", "--out", out, "-b", "2")
    assert run_pds(*args, "-n", "2").exit_code == 0
    record = json.loads((out / "run.json").read_text())
    assert record["noise_version"] == NOISE_VERSION == record["fingerprint"]["noise_version"]

    # The same version resumes (extends the run) ...
    assert run_pds(*args, "-n", "3", "--resume").exit_code == 0
    # ... a run made before the version was recorded (version 1) does not.
    record = json.loads((out / "run.json").read_text())
    del record["fingerprint"]["noise_version"]
    (out / "run.json").write_text(json.dumps(record))
    r = run_pds(*args, "-n", "4", "--resume")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert f"noise generator version 1 and this pds draws version {NOISE_VERSION}" in r.stderr
    assert not (out / "000003.png").exists()


def test_round_keys_as_a_tensor_give_the_same_words():
    # The compiled GPU kernel takes the key schedule as a tensor input; the words must not change.
    from pdscli.noise import key_schedule, normals

    seed = 2**40 + 12345
    key = (seed & MASK32, seed >> 32)
    noise = SampleNoise(seed, [3, 9], SHAPE)
    table = torch.tensor(key_schedule(key), dtype=torch.int64)
    for d in range(2):
        draw = torch.tensor(d, dtype=torch.int64)
        a = normals(key, noise.rows, draw, noise.groups, noise.numel)
        b = normals(table, noise.rows, draw, noise.groups, noise.numel)
        assert torch.equal(a, b)
    assert key_schedule(key)[0] == key and len(key_schedule(key)) == 10
