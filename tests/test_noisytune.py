"""noisytune_'s frontend: all checks before any change, parameter selection, C5 stds."""


import pytest
import torch
from torch import nn

import fastnoise
from fastnoise import reference as R
from fastnoise.backends import BackendUnavailableError, available_backends


def _snapshot(tensors):
    return [t.detach().clone() for t in tensors]


def _unchanged(tensors, before):
    return all(torch.equal(t, b) for t, b in zip(tensors, before))


# --------------------------------------------------------------------------------------
# 1. nothing changes when a call fails (#14 item 7)
# --------------------------------------------------------------------------------------
def _refused_dtype(name):
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        if name not in available_backends("cpu", dtype, op="noisytune"):
            return dtype
    return None


@pytest.mark.parametrize("name", ["triton", "cuda", "cpu"])
def test_backend_refusing_a_later_group_changes_nothing(name):
    ok = [d for d in (torch.float32,) if name in available_backends("cpu", d, op="noisytune")]
    refused = _refused_dtype(name)
    if not ok or refused is None:
        pytest.skip(f"backend {name!r} runs every dtype here, or none")
    tensors = [torch.randn(5, 7), torch.randn(9).to(refused), torch.randn(3, 3)]
    before = _snapshot(tensors)
    with pytest.raises(BackendUnavailableError):
        fastnoise.noisytune_(tensors, 0.15, seed=1, backend=name)
    assert _unchanged(tensors, before)
    # the retry on a backend that runs everything perturbs each tensor exactly once
    fastnoise.noisytune_(tensors, 0.15, seed=1, backend="reference")
    expect = _snapshot(before)
    R.noisytune_(expect, 0.15, seed=1)
    assert all(torch.equal(t, e) for t, e in zip(tensors, expect))


@pytest.mark.parametrize("bad, error", [
    (lambda: torch.arange(6), TypeError),                       # integer tensor
    (lambda: torch.empty(4, 4, device="meta"), ValueError),     # no values
    (lambda: "weights", TypeError),                             # not a tensor
])
def test_a_bad_tensor_anywhere_changes_nothing(bad, error):
    good = [torch.randn(6, 5), torch.randn(8)]
    before = _snapshot(good)
    with pytest.raises(error):
        fastnoise.noisytune_([good[0], bad(), good[1]], 0.15, seed=2)
    assert _unchanged(good, before)


def test_meta_parameter_is_named():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4, device="meta"))
    before = _snapshot(model[0].parameters())
    with pytest.raises(ValueError, match=r"1\.weight is on the meta device"):
        fastnoise.noisytune_(model, 0.15, seed=3)
    assert _unchanged(model[0].parameters(), before)


def test_zero_like_attributes_without_a_partition_raise():
    """A placeholder of numel 0 that says it stands for more (a ZeRO-3 parameter deepspeed
    did not partition as expected) is an error, never a no-op."""
    w = nn.Parameter(torch.empty(0))
    w.ds_shape, w.ds_numel = torch.Size([6, 4]), 24
    with pytest.raises(ValueError, match="tensors\\[0\\].*ZeRO"):
        fastnoise.noisytune_([w], 0.15, seed=1)


# --------------------------------------------------------------------------------------
# 2. parameter selection (#13 item 6)
# --------------------------------------------------------------------------------------
def _mlp():
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 7), nn.Linear(7, 3))


def _expected(model, names, lam, seed):
    """The reference on the full parameter order, then only ``names`` kept perturbed."""
    params = dict(model.named_parameters())
    noisy = _snapshot(params.values())
    R.noisytune_(noisy, lam, seed=seed)
    return {n: (noisy[k] if n in names else p.detach().clone())
            for k, (n, p) in enumerate(params.items())}


@pytest.mark.parametrize("kwargs, names", [
    (dict(include="0.*"), {"0.weight", "0.bias"}),
    (dict(include=["0.weight", "3.*"]), {"0.weight", "3.weight", "3.bias"}),
    (dict(exclude="*.bias"), {"0.weight", "2.weight", "3.weight"}),
    (dict(include="[02].*", exclude="*.bias"), {"0.weight", "2.weight"}),
    (dict(trainable_only=True), {"0.weight", "0.bias", "3.weight", "3.bias"}),
])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_selection_keeps_each_parameters_noise(kwargs, names, backend):
    torch.manual_seed(4)
    model = _mlp()
    for p in model[2].parameters():
        p.requires_grad_(False)
    expect = _expected(model, names, 0.15, seed=11)
    fastnoise.noisytune_(model, 0.15, seed=11, backend=backend, **kwargs)
    for n, p in model.named_parameters():
        # the noise a parameter gets does not depend on what else is selected
        assert torch.allclose(p, expect[n], rtol=0, atol=1e-6), n
        assert torch.equal(p, expect[n]) or backend == "auto", n


def test_selection_errors():
    model = _mlp()
    before = _snapshot(model.parameters())
    with pytest.raises(ValueError, match=r"\['*lora_*'\]".replace("*", r"\*")):
        fastnoise.noisytune_(model, include="*lora_*")
    with pytest.raises(ValueError, match="nope"):
        fastnoise.noisytune_(model, include="0.*", exclude=["*.bias", "nope"])
    with pytest.raises(ValueError, match="leaves no parameter"):
        fastnoise.noisytune_(model, include="0.*", exclude="0.*")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="leaves no parameter"):
        fastnoise.noisytune_(model, trainable_only=True)
    with pytest.raises(TypeError, match="nn.Module"):
        fastnoise.noisytune_(list(model.parameters()), include="*")
    with pytest.raises(TypeError, match="nn.Module"):
        fastnoise.noisytune_(list(model.parameters()), trainable_only=True)
    with pytest.raises(TypeError, match="glob pattern"):
        fastnoise.noisytune_(model, exclude=[3])
    assert _unchanged(model.parameters(), before)


def _lora_llama():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=64)
    base = transformers.LlamaForCausalLM(cfg)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return peft.get_peft_model(base, lora)


@pytest.mark.parametrize("kwargs, perturbed", [
    (dict(exclude="*lora_*"), lambda n: "lora_" not in n),
    (dict(trainable_only=True), lambda n: "lora_" in n),
    (dict(include="*lora_*"), lambda n: "lora_" in n),
])
def test_peft_lora_selection(kwargs, perturbed):
    torch.manual_seed(5)
    model = _lora_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fastnoise.noisytune_(model, 0.15, seed=6, **kwargs)
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        constant = before[n].numel() < 2 or float(before[n].float().std()) == 0  # norms: 1s
        assert moved == (perturbed(n) and not constant), n


def test_callback_passes_the_selection_through(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from fastnoise.trainer import FastNoiseCallback

    class Tokens(torch.utils.data.Dataset):
        ids = torch.randint(1, 64, (8, 10))

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    torch.manual_seed(7)
    model = _lora_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1,
                                          per_device_train_batch_size=4, report_to=[],
                                          use_cpu=True, save_strategy="no", learning_rate=0.0)
    callback = FastNoiseCallback("neftune", 5.0, noisytune_lam=0.15, seed=8,
                                 noisytune_exclude="*lora_*")
    transformers.Trainer(model=model, args=args, train_dataset=Tokens(),
                         callbacks=[callback]).train()
    expect = dict(model.named_parameters())
    ref = _snapshot(before.values())
    R.noisytune_(ref, 0.15, seed=8)
    for k, (n, p) in enumerate(expect.items()):
        want = before[n] if "lora_" in n else ref[k]
        assert torch.allclose(p, want, rtol=0, atol=1e-6), n
    assert any(not torch.equal(expect[n], before[n]) for n in before if "lora_" not in n)
    # it logs what it perturbed (the selection's tensors but the norms: std 0) and skipped
    norms = sum("norm" in n for n in before)
    assert callback.logged["fastnoise/noisytune_perturbed"] == sum(
        "lora_" not in n for n in before) - norms
    assert callback.logged["fastnoise/noisytune_skipped_std_0"] == norms > 0


def test_a_generator_of_tensors_is_read_once():
    tensors = [torch.randn(4, 5), torch.randn(6)]
    expect = _snapshot(tensors)
    R.noisytune_(expect, 0.15, seed=3)
    fastnoise.noisytune_((t for t in tensors), 0.15, seed=3, backend="reference")
    assert all(torch.equal(t, e) for t, e in zip(tensors, expect))


def test_callback_checks_before_noisytune_changes_anything(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from fastnoise.trainer import FastNoiseCallback

    with pytest.raises(TypeError, match="noisytune_exclude"):
        FastNoiseCallback("neftune", noisytune_lam=0.1, noisytune_exclude=[None])
    model = _lora_llama()
    before = _snapshot(model.parameters())
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[],
                                          use_cpu=True, neftune_noise_alpha=5.0)
    callback = FastNoiseCallback("neftune", noisytune_lam=0.15, seed=1)
    with pytest.raises(ValueError, match="neftune_noise_alpha"):
        callback.on_train_begin(args, transformers.TrainerState(), None, model=model)
    assert _unchanged(model.parameters(), before)


# --------------------------------------------------------------------------------------
# C5: given statistics
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", available_backends("cpu", torch.float32, op="noisytune"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_apply_noisytune_with_given_stds(backend, dtype):
    if dtype not in (torch.float32,) and backend not in available_backends("cpu", dtype,
                                                                           op="noisytune"):
        pytest.skip(f"{backend} does not run {dtype}")
    tensors = [torch.randn(7, 3).to(dtype), torch.randn(13).to(dtype), torch.randn(5).to(dtype)]
    stds = [0.5, 3.25, 0.0]  # 0: unchanged
    expect = _snapshot(tensors)
    R.noisytune_(expect, 0.2, seed=12, offset=40, stds=stds)
    starts = R.noisytune_offsets([t.numel() for t in tensors], 40)
    before = _snapshot(tensors)
    torch.ops.fastnoise.apply_noisytune_(tensors, 0.2, 12, starts, backend, stds)
    for t, e, b in zip(tensors, expect, before):
        assert torch.equal(t, e)
    assert torch.equal(tensors[2], before[2])
    # the given std is what sets the size, not the tensor's own
    x = before[1].to(torch.float32)
    assert (tensors[1].to(torch.float32) - x).abs().max() <= 0.5 * 0.2 * 3.25 * 1.01
    with pytest.raises(ValueError, match="stds"):
        torch.ops.fastnoise.apply_noisytune_(tensors, 0.2, 12, starts, backend, [1.0])


def test_opcheck_apply_noisytune_with_stds():
    tensors = [torch.randn(5, 7), torch.randn(33)]
    torch.library.opcheck(torch.ops.fastnoise.apply_noisytune_.default,
                          (tensors, 0.15, 3, [0, 9], "reference", [1.5, 0.25]),
                          test_utils=("test_schema", "test_faketensor"))
