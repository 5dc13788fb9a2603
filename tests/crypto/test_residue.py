"""The residue-domain Linear layer computes exactly what SEAL's weight-by-weight loop computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdsec.he.residue import LayoutError, ResidueLinear, residues
from kdsec.he.params import HEParams, plan_paired
from kdsec.he.seal import KeyHolder
from kdsec.he.bundle import ParamsHeader


def _seal_sum(public, inputs, integers, weight_scale):
    total = None
    for value, integer in zip(inputs, integers):
        if integer:
            term = public.multiply_encoded(value, public.encode(float(integer) / weight_scale, value.parms_id(),
                                                                 weight_scale))
            total = term if total is None else public.add_inplace(total, term)
    return total


def _conv_matrix(seed: int) -> np.ndarray:
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(1, 3, 3, 2, 1)
    return torch.autograd.functional.jacobian(lambda x: conv(x.reshape(1, 1, 10, 10)).reshape(-1),
                                              torch.zeros(100)).numpy().astype(np.float64)


@pytest.mark.parametrize("chain", ["paired", "classic"])
def test_residue_products_equal_seal_word_for_word(chain):
    rng = np.random.default_rng(0)
    if chain == "paired":  # 60-bit primes, weights at 2^15
        params, weight_scale = HEParams(8192, (60, 60, 60), 30, None, 15), 2.0**15
    else:  # 60-bit decryption prime and 30-bit primes, weights at 2^30: limbs and both reductions
        params, weight_scale = HEParams(8192, (60, 30, 30, 60), 30, 15), 2.0**30
    holder = KeyHolder(params)
    public = holder.public
    x = rng.normal(size=(100, params.slots))
    fresh = [holder.encrypt(row) for row in x]
    cases = [
        ("sparse conv, fresh inputs", _conv_matrix(0), fresh),  # row groups over shared columns
        ("dense with pruned zeros and negatives, size-3 inputs",
         rng.normal(size=(7, 12)) * (rng.random((7, 12)) < 0.6),
         [public.square(c, relinearize=False) for c in fresh[:12]]),  # unrelinearized squares: 3 parts
    ]
    for name, weight, inputs in cases:
        layer = ResidueLinear(weight, weight_scale)
        assert layer.usable
        produced = layer.apply(public.evaluator, public.context, inputs, weight_scale)
        assert set(produced) == set(np.flatnonzero(layer.integers.any(axis=1)).tolist()), name
        for row, ciphertext in produced.items():
            expected = _seal_sum(public, inputs, layer.integers[row], weight_scale)
            assert np.array_equal(residues(ciphertext), residues(expected)), (name, row)
            assert ciphertext.scale == expected.scale and ciphertext.parms_id() == expected.parms_id()
    # and it decrypts to the product (a conv row, at scale Δ·weight_scale)
    layer = ResidueLinear(cases[0][1], weight_scale)
    out = layer.apply(public.evaluator, public.context, fresh, weight_scale)[4]
    assert np.abs(holder.decrypt(out) - layer.integers[4] / weight_scale @ x).max() < 1e-3


def test_inputs_of_two_levels_or_a_foreign_object_are_refused():
    params = HEParams(8192, (60, 60, 60), 30, None, 15)
    holder = KeyHolder(params)
    top = holder.encrypt(np.ones(8))
    lower = holder.encrypt(np.ones(8))
    holder.public.evaluator.mod_switch_to_next_inplace(lower)
    layer = ResidueLinear(np.ones((1, 2)), 2.0**15)
    with pytest.raises(ValueError, match="one level, size and scale"):
        layer.apply(holder.public.evaluator, holder.public.context, [top, lower], 2.0**15)
    with pytest.raises(LayoutError, match="not a SEAL ciphertext: Plaintext"):
        residues(holder.public.encode(1.0, top.parms_id()))  # checked before any memory is read


def test_the_paired_chain_and_its_header():
    one, two = plan_paired(1, 15, 14), plan_paired(2, 15, 14)
    assert one == HEParams(8192, (60, 60, 60), 30, None, 15) and one.program_depth == 3
    # two x²: four 54-bit primes fit N=8192 but leave inputs 24 bits; the next ring keeps 30
    assert two == HEParams(16384, (60, 60, 60, 60), 30, None, 15) and two.program_depth == 5
    assert plan_paired(1, 13, 14) is None  # the last Linear's values would not fit the decryption prime
    assert ParamsHeader(**one.as_dict()).weight_scale_bits == 15
    for bad in ({**one.as_dict(), "coeff_mod_bit_sizes": [60, 59, 60]},  # the rescale would not give Δ back
                {**one.as_dict(), "last_scale_bits": 15},
                {**one.as_dict(), "weight_scale_bits": 25}):
        with pytest.raises(ValueError):
            ParamsHeader(**bad)


@pytest.mark.parametrize("ring", [8192, 32768])
def test_limb_sums_recombine_exactly_modulo_every_prime_size(ring):
    """Σ sums[l]·2^(l·bits) mod q against Python's integers, for SEAL's primes of 30-60 bits, limb
    widths from 4 to 50 (capped the way ``apply`` caps them) and sums of both signs at ±2^52."""
    import tenseal.sealapi as seal

    from kdsec.he.residue import _combine

    rng = np.random.default_rng(ring)
    primes = [m.value() for m in seal.CoeffModulus.Create(ring, [30, 44, 50, 60])]
    for prime in primes:
        for wanted in (4, 13, 20, 30, 34, 42, 50):
            bits = min(wanted, 60 - ((1 << prime.bit_length()) - prime).bit_length())
            limbs = -(-prime.bit_length() // bits)
            sums = [rng.integers(-(1 << 52) + 1, 1 << 52, size=64).astype(np.float64) for _ in range(limbs)]
            sums[0][:2] = [(1 << 52) - 1, -(1 << 52) + 1]  # the extremes
            got = _combine([s.copy() for s in sums], bits, prime)
            want = [sum(int(s[i]) << (l * bits) for l, s in enumerate(sums)) % prime for i in range(64)]
            assert got.tolist() == want, (prime, bits)


def test_wide_rows_run_in_two_halves_when_that_saves_a_limb():
    """Rows whose L1 norm leaves 29-bit limbs (3 for a 60-bit prime) run as two column halves with
    30-bit limbs (2), their sums below 2^53: still SEAL's words exactly."""
    rng = np.random.default_rng(3)
    params = HEParams(8192, (60, 60, 60), 30, None, 15)
    holder = KeyHolder(params)
    weight = rng.uniform(0.28, 0.32, size=(3, 845)) * rng.choice([-1, 1], size=(3, 845))
    layer = ResidueLinear(weight, 2.0**15)
    assert len(layer.blocks[0].parts) == 2 and layer.limb_bits >= 30 and layer.sum_bits == 53
    inputs = [holder.encrypt(rng.normal(size=8)) for _ in range(845)]
    produced = layer.apply(holder.public.evaluator, holder.public.context, inputs, 2.0**15)
    for row, ciphertext in produced.items():
        expected = _seal_sum(holder.public, inputs, layer.integers[row], 2.0**15)
        assert np.array_equal(residues(ciphertext), residues(expected))


def test_another_seal_layout_falls_back_to_seals_loop_with_the_same_logits(monkeypatch):
    """Where residues() cannot read the ciphertexts (another SEAL build), the paired chain runs the
    same integer weights through SEAL's per-weight products: the same decrypted logits."""
    import kdsec.he.residue as residue_module
    from kdsec.config import HEConfig
    from kdsec.he import LinearOp, SquareOp, plaintext_forward, run_encrypted_input

    rng = np.random.default_rng(5)
    ops = [LinearOp(rng.normal(size=(6, 8)) * 0.3, rng.normal(size=6)), SquareOp(),
           LinearOp(rng.normal(size=(3, 6)) * 0.3, rng.normal(size=3))]
    inputs = rng.uniform(-1, 1, size=(32, 8))
    config = HEConfig(host_workers=1)
    fast, run = run_encrypted_input(ops, inputs, config, "batched")
    assert run.weight_scale_bits == 15

    def unreadable(ciphertext):
        raise LayoutError("SEAL's ciphertext layout is not the one this module reads")

    monkeypatch.setattr(residue_module, "residues", unreadable)
    slow, _ = run_encrypted_input(ops, inputs, config, "batched")
    np.testing.assert_allclose(slow, fast, atol=1e-4)
    np.testing.assert_allclose(slow, plaintext_forward(ops, inputs), atol=1e-3)


def test_features_summed_group_by_group_equal_the_whole_product_word_for_word():
    """A host sums the first layer a message of features at a time (``accumulate``, each share
    reduced modulo its prime): the same words as ``apply`` on all the features at once — for a
    sparse conv (some groups miss whole blocks) and for wide rows in two halves."""
    rng = np.random.default_rng(7)
    params = HEParams(8192, (60, 60, 60), 30, None, 15)
    holder = KeyHolder(params)
    public = holder.public
    for weight in (_conv_matrix(1), rng.uniform(0.28, 0.32, size=(3, 100)) * rng.choice([-1, 1], size=(3, 100))):
        inputs = [holder.encrypt(rng.normal(size=params.slots)) for _ in range(weight.shape[1])]
        layer = ResidueLinear(weight, 2.0**15)
        whole = layer.apply(public.evaluator, public.context, inputs, 2.0**15)
        summed = None
        for group in np.array_split(np.arange(len(inputs)), 4):
            summed = layer.accumulate(public.evaluator, public.context, [inputs[i] for i in group], int(group[0]),
                                      2.0**15, summed)
        assert set(summed) == set(whole)
        for row in whole:
            assert np.array_equal(residues(summed[row]), residues(whole[row])), row
            assert summed[row].scale == whole[row].scale


def test_a_streamed_chunk_gives_the_logits_of_the_whole_chunk():
    """``BatchedServer.stream``: features fed in uneven groups, the rest of the network after the last."""
    from kdsec.config import HEConfig
    from kdsec.he import BatchedServer, LinearOp, SquareOp, plaintext_forward

    rng = np.random.default_rng(9)
    ops = [LinearOp(rng.normal(size=(6, 9)) * 0.3 * (rng.random((6, 9)) < 0.7), rng.normal(size=6)), SquareOp(),
           LinearOp(rng.normal(size=(3, 6)) * 0.3, rng.normal(size=3))]
    params = BatchedServer.params(ops, HEConfig())
    holder = KeyHolder(params)
    x = rng.uniform(-1, 1, size=(16, 9))
    required = BatchedServer.required_inputs(ops)
    server = BatchedServer(holder.public, ops)
    whole = server.infer([holder.encrypt(x[:, i]) for i in required])
    stream = server.stream()
    for group in (required[:1], required[1:5], required[5:]):
        stream.feed([holder.encrypt(x[:, i]) for i in group])
    streamed = stream.finish()
    decrypt = lambda cts: np.stack([holder.decrypt(ct)[:16] for ct in cts], axis=1)  # noqa: E731
    np.testing.assert_allclose(decrypt(streamed), decrypt(whole), atol=1e-4)
    np.testing.assert_allclose(decrypt(streamed), plaintext_forward(ops, x), atol=1e-3)
    with pytest.raises(Exception, match=f"expected {len(required)} encrypted input features, got 4"):
        short = server.stream()
        short.feed([holder.encrypt(x[:, i]) for i in required[:4]])
        short.finish()
