"""The reference itself: Philox, the element -> counter mapping, distributions, scales."""

import math

import pytest
import torch

from fastnoise import reference as R
from fastnoise import stats
from fastnoise.check import PHILOX_KAT


@pytest.mark.parametrize("ctr,key,expect", PHILOX_KAT)
def test_philox_known_answers(ctr, key, expect):
    words = [torch.tensor([c], dtype=torch.int64) for c in ctr]
    got = R.philox4x32(key[0] | (key[1] << 32), *words)
    assert tuple(int(w) for w in got) == expect


def _scalar_word(seed, counter, word):
    """One Philox word of one 64-bit counter, computed on its own (a second path)."""
    lo = torch.tensor([counter & R.M32])
    hi = torch.tensor([(counter >> 32) & R.M32])
    return int(R.philox4x32(seed, lo, hi)[word][0])


@pytest.mark.parametrize("d", [1, 3, 4, 7, 130])
def test_uniform_element_mapping(d):
    seed, offset, n = 0xDEADBEEF12345678, 2**32 - 3, 3
    xi = R.draw_noise("uniform", n, d, seed, offset)
    g = math.ceil(d / 4)
    for r in range(n):
        for j in {0, d // 2, d - 1}:
            w = _scalar_word(seed, offset + r * g + j // 4, j % 4)
            v = w if w < 2**31 else (~w) & 0x7FFFFFFF
            u = torch.tensor(float(v), dtype=torch.float32) * torch.tensor(R.UNIFORM_SCALE,
                                                                           dtype=torch.float32)
            assert xi[r, j] == u * 2 - 1


@pytest.mark.parametrize("d", [1, 33, 128, 300])
def test_bernoulli_element_mapping(d):
    seed, offset, n = 12345, 2**64 - 2, 3  # the counter wraps past 2**64
    xi = R.draw_noise("bernoulli", n, d, seed, offset)
    g = math.ceil(d / 128)
    for r in range(n):
        for j in {0, d // 3, d - 1}:
            w = _scalar_word(seed, (offset + r * g + j // 128) % 2**64, (j % 128) // 32)
            bit = (w >> (j % 32)) & 1
            assert xi[r, j] == 1 - 2 * bit


def test_gaussian_is_box_muller_of_the_same_words():
    seed, d = 77, 8
    xi = R.draw_noise("gaussian", 2, d, seed)
    u = R.uniform01(R.noise_words(seed, 0, 4)).double()
    ua, ub = u[:, 0].clamp_min(1e-7), u[:, 1]
    rad = torch.sqrt(-2 * torch.log(ua))
    expect = rad * torch.cos(2 * math.pi * ub)
    torch.testing.assert_close(xi.reshape(4, 4)[:, 0].double(), expect, rtol=1e-6, atol=1e-6)


def test_offset_continues_the_stream():
    seed = 99
    for noise, d in [("uniform", 10), ("bernoulli", 200), ("gaussian", 9)]:
        g = R.counters_per_row(noise, d)
        whole = R.draw_noise(noise, 3, d, seed, 0)
        assert torch.equal(whole[2:], R.draw_noise(noise, 1, d, seed, 2 * g))
        assert R.counters_used(noise, 3, d) == 3 * g


def test_seeds_give_different_streams():
    a = R.draw_noise("uniform", 4, 64, 1)
    b = R.draw_noise("uniform", 4, 64, 2)
    c = R.draw_noise("uniform", 4, 64, 1 + 2**32)  # differs only in the key's high word
    assert not torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, R.draw_noise("uniform", 4, 64, 1))


@pytest.mark.parametrize("noise,seed", [("uniform", 1), ("uniform", 2**63 + 5),
                                        ("gaussian", 3), ("gaussian", 2**40),
                                        ("bernoulli", 4), ("bernoulli", 2**64 - 1)])
def test_distributions(noise, seed):
    xi = R.draw_noise(noise, 100, 1000, seed)
    s = stats.check_noise_samples(noise, xi)
    assert s.ok, s.problems
    if noise == "uniform":
        assert -1 <= s.min and s.max < 1
    if noise == "bernoulli":
        assert set(xi.unique().tolist()) == {-1.0, 1.0}


def test_ks_detects_the_wrong_distribution():
    xi = R.draw_noise("gaussian", 100, 1000, 5)
    assert not stats.check_noise_samples("uniform", xi.clamp(-0.999, 0.999)).ok
    assert not stats.check_noise_samples("gaussian", xi * 1.1).ok
    assert not stats.check_noise_samples("uniform", R.draw_noise("uniform", 10, 100, 1) * 0.9).ok


def test_uniform01_extremes():
    w = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1], dtype=torch.int64)
    u = R.uniform01(w)
    assert u.dtype == torch.float32
    assert u.min() >= 0 and u.max() < 1
    assert u[0] == 0 and u[4] == 0  # ~0xFFFFFFFF & 0x7FFFFFFF == 0


@pytest.mark.parametrize("alpha,length,d", [(5.0, 2048, 4096), (15.0, 1, 7), (0.0, 9, 9)])
def test_noise_scale(alpha, length, d):
    mag = R.noise_scale(alpha, length, d)
    assert mag == float(torch.tensor(alpha / math.sqrt(length * d)).float())
    assert R.noise_scale(alpha, 0, d) == 0.0


def test_token_scale_with_mask():
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0]])
    tok = R.token_scale(5.0, 16, 12, 4, attention_mask=mask).view(3, 4)
    assert torch.equal(tok[0], torch.tensor([R.noise_scale(5.0, 3, 16)] * 3 + [0.0]))
    assert torch.equal(tok[1], torch.zeros(4))  # no noise and no division by zero
    assert tok[2, 0] == R.noise_scale(5.0, 2, 16) and tok[2, 1] == 0
    assert torch.isfinite(tok).all()


def test_reference_forward_formula():
    weight = torch.randn(20, 6)
    ids = torch.randint(0, 20, (9,))
    out = R.noisy_embedding(ids, weight, noise="uniform", mag=0.25, seed=3, offset=11)
    xi = R.draw_noise("uniform", 9, 6, 3, 11)
    assert torch.equal(out, weight[ids] + xi * torch.tensor(0.25))
    pair = R.noisy_embedding(ids, weight, noise="uniform", mag=0.25, seed=3, offset=11,
                             symmetric=True)
    assert torch.equal(pair[:9], out)
    assert torch.equal(pair[9:], weight[ids] - xi * torch.tensor(0.25))


def test_reference_forward_rounds_once_for_half_precision():
    weight = torch.randn(20, 6).half()
    ids = torch.randint(0, 20, (5,))
    out = R.noisy_embedding(ids, weight, noise="gaussian", mag=0.1, seed=1)
    xi = R.draw_noise("gaussian", 5, 6, 1)
    assert out.dtype == torch.float16
    assert torch.equal(out, (weight[ids].float() + xi * torch.tensor(0.1)).half())


def test_noisytune_offsets_and_formula():
    assert R.noisytune_offsets([5, 1, 8, 3], 10) == [10, 12, 13, 15]
    a, b = torch.randn(6, 5), torch.randn(9)
    a0, b0 = a.clone(), b.clone()
    R.noisytune_([a, b], 0.15, seed=4, offset=100)
    u = R.uniform01(R.noise_words(4, 100 + 8, 3)).reshape(-1)[:9]
    assert torch.equal(b, b0 + (u - 0.5) * (torch.tensor(0.15) * b0.std()))
    ua = R.uniform01(R.noise_words(4, 100, 8)).reshape(-1)[:30].view(6, 5)
    assert torch.equal(a, a0 + (ua - 0.5) * (torch.tensor(0.15) * a0.std()))


def test_token_scale_of_packed_segments():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    starts = R.segment_starts(12, 6, position_ids=pos)
    assert starts.nonzero().flatten().tolist() == [0, 3, 5, 6, 10]
    tok = R.token_scale(5.0, 8, 12, 6, position_ids=pos)
    lengths = [3, 3, 3, 2, 2, 1, 4, 4, 4, 4, 2, 2]
    assert tok.tolist() == [R.noise_scale(5.0, n, 8) for n in lengths]
    cu = torch.tensor([0, 3, 5, 6, 10, 12])
    assert torch.equal(R.segment_starts(12, 6, cu_seqlens=cu), starts)
    assert torch.equal(R.token_scale(5.0, 8, 12, 6, cu_seqlens=cu), tok)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 5] = 0  # padding inside the last segment: L counts kept tokens only
    tok = R.token_scale(5.0, 8, 12, 6, position_ids=pos, attention_mask=mask)
    assert tok[10] == R.noise_scale(5.0, 1, 8) and tok[11] == 0


def test_token_scale_rows_never_share_a_sequence():
    """position_ids that do not restart at a row start still start a sequence there; cu_seqlens
    (flash-attention varlen) may run across rows."""
    pos = torch.tensor([[0, 1, 2], [3, 4, 0]])
    assert R.segment_starts(6, 3, position_ids=pos).tolist() == [1, 0, 0, 1, 0, 1]
    cu = torch.tensor([0, 4, 6])
    assert R.segment_starts(6, 3, cu_seqlens=cu).tolist() == [1, 0, 0, 0, 1, 0]


def test_token_scale_of_invalid_packing_is_nan():
    assert R.token_scale(1.0, 4, 6, 3, position_ids=torch.tensor([[0, 1, -1], [0, 1, 2]])
                         ).isnan().all()
    for cu in ([0, 7], [1, 6], [0, 4, 3, 6]):
        assert R.token_scale(1.0, 4, 6, 3, cu_seqlens=torch.tensor(cu)).isnan().all()
