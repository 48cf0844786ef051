"""One rank of tests/test_zero.py: DeepSpeed ZeRO on the CPU (gloo, 2 processes). Prints
``rank R: ok`` and exits 0 when every check of the phase (argv[2]) passed."""

import os
import sys
import tempfile

import torch
import torch.distributed as dist

import fastnoise
from fastnoise import reference as R

import deepspeed  # noqa: E402
ds_comm_torch = sys.modules["deepspeed.comm.torch"]  # (deepspeed.comm.torch is torch)
from deepspeed.utils import safe_get_local_fp32_param  # noqa: E402
import transformers  # noqa: E402
# first imported inside deepspeed.zero.Init (which patches tensor constructors), dynamo's
# polyfills fail their signature check: import the model code before
import torch._dynamo  # noqa: E402,F401
from transformers.models.llama import modeling_llama  # noqa: E402,F401

# DeepSpeed's CPU accelerator builds a shared-memory allreduce op (C++, ~45 s) when it starts;
# the collectives here are gloo's, so do without it
ds_comm_torch.build_shm_op = lambda: None

LAM, SEED = 0.15, 1234


def _config(stage, **extra):
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
           "wall_clock_breakdown": False, "zero_allow_untested_optimizer": True}
    cfg.update(extra)
    return cfg


def _llama_config():
    # odd sizes: on rank 1 the partitions of 61 * 20 = 1220 (embeddings), 20 (norms) and 21
    # (gate/up biases: 11 per rank, rank 1's last element is padding) elements start at
    # global indices that are not multiples of 4
    return transformers.LlamaConfig(vocab_size=61, hidden_size=20, intermediate_size=21,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=1, max_position_embeddings=32,
                                    tie_word_embeddings=False, mlp_bias=True)


def _zero3_llama(stage3_config):
    with deepspeed.zero.Init(config_dict_or_path=stage3_config):
        return transformers.LlamaForCausalLM(_llama_config())


def _gathered(model):
    """Full copies of every parameter (ZeRO-3: gathered from the partitions)."""
    params = [p for _, p in model.named_parameters()]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return [p.detach().clone() for p in params]


def _expected(full, lam, seed):
    """The unpartitioned result: the reference with each tensor's float64 std."""
    out = [t.clone() for t in full]
    stds = [float(t.double().std()) if t.numel() > 1 else 0.0 for t in out]
    R.noisytune_(out, lam, seed=seed, stds=stds)
    return out


def _expect_error(kind, text, fn, what):
    """``fn()`` must raise ``kind`` with ``text`` in its message."""
    try:
        fn()
    except kind as exc:
        assert text in str(exc), exc
    else:
        raise AssertionError(f"{what} did not raise")


def _assert_all_equal(got, want, names, what):
    for n, g, w in zip(names, got, want):
        assert torch.equal(g, w), f"{what}: {n} differs by {(g - w).abs().max()}"


def _batch(rank, step):
    gen = torch.Generator().manual_seed(100 * rank + step)
    ids = torch.randint(0, 61, (2, 9), generator=gen)
    return {"input_ids": ids, "labels": ids}


# --------------------------------------------------------------------------------------
def check_zero3_noisytune(rank):
    cfg = _config(3)
    for backend in ("reference", "auto"):
        torch.manual_seed(1)  # same init on both ranks (zero.Init partitions rank 0's values)
        model = _zero3_llama(cfg)
        params = dict(model.named_parameters())
        assert all(p.numel() == 0 for p in params.values()), "not partitioned"
        full = _gathered(model)
        want = _expected(full, LAM, SEED)
        gate_bias = params["model.layers.0.mlp.gate_proj.bias"]
        assert gate_bias.ds_numel == 21 and gate_bias.ds_tensor.numel() == 11
        padding = gate_bias.ds_tensor[-1].clone()
        fastnoise.noisytune_(model, LAM, seed=SEED, backend=backend)
        got = _gathered(model)
        _assert_all_equal(got, want, list(params), f"ZeRO-3 noisytune_ ({backend})")
        assert any(not torch.equal(g, f) for g, f in zip(got, full))
        if rank == 1:
            assert torch.equal(gate_bias.ds_tensor[-1], padding), "padding was perturbed"
        # the public unpartitioned call agrees too (its std in its own arithmetic)
        public = [t.clone() for t in full]
        fastnoise.noisytune_(public, LAM, seed=SEED, backend=backend)
        for n, g, w in zip(params, got, public):
            assert torch.allclose(g, w, rtol=0, atol=1e-6 * max(1.0, float(w.abs().max()))), n
        # selection on partitions: skipped parameters keep their counters
        model2 = _zero3_llama(cfg) if backend == "reference" else None
        if model2 is not None:
            full2 = _gathered(model2)
            fastnoise.noisytune_(model2, LAM, seed=SEED, backend=backend,
                                 include="*.weight", exclude="*embed_tokens*")
            got2 = _gathered(model2)
            want2 = _expected(full2, LAM, SEED)
            for n, g, w, f in zip(params, got2, want2, full2):
                expect = w if (n.endswith(".weight") and "embed_tokens" not in n) else f
                assert torch.equal(g, expect), f"selection on ZeRO-3: {n}"

    # bf16 partitions (the kernels' bf16 rounding), std from the bf16 values
    bf16 = _config(3, bf16={"enabled": True})
    torch.manual_seed(1)
    model = _zero3_llama(bf16)
    assert model.get_input_embeddings().weight.ds_tensor.dtype == torch.bfloat16
    full16 = _gathered(model)
    fastnoise.noisytune_(model, LAM, seed=SEED, backend="auto")
    _assert_all_equal(_gathered(model), _expected(full16, LAM, SEED), list(params), "bf16")

    # a drawn seed is rank 0's: only rank 0's generator decides, whatever the others hold
    results = []
    for other_rank_seed in (51, 999):
        torch.manual_seed(1)
        model = _zero3_llama(cfg)
        full = _gathered(model)
        torch.manual_seed(50 if rank == 0 else other_rank_seed)
        fastnoise.noisytune_(model, LAM)
        results.append(_gathered(model))
    _assert_all_equal(results[0], results[1], list(params), "drawn seed")
    assert any(not torch.equal(g, f) for g, f in zip(results[0], full))


def check_zero3_errors(rank):
    cfg = _config(3)
    torch.manual_seed(1)
    model = _zero3_llama(cfg)
    before = [p.ds_tensor.clone() for p in model.parameters()]
    emb = model.get_input_embeddings().weight
    with deepspeed.zero.GatheredParameters([emb], modifier_rank=None):
        _expect_error(RuntimeError, "model.embed_tokens.weight is gathered",
                      lambda: fastnoise.noisytune_(model, LAM, seed=SEED),
                      "noisytune_ on a gathered ZeRO-3 parameter")
    part = emb.ds_tensor
    emb.ds_tensor = None  # deepspeed not partitioning as expected
    try:
        _expect_error(ValueError, "model.embed_tokens.weight",
                      lambda: fastnoise.noisytune_(model, LAM, seed=SEED),
                      "a ZeRO-3 parameter without a partition")
    finally:
        emb.ds_tensor = part
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.ds_tensor, b), "a failed call changed a partition"


def _train(engine, rank, steps=2):
    losses = []
    for step in range(steps):
        loss = engine(**_batch(rank, step)).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
        assert torch.isfinite(loss), loss
    return losses


def check_zero3_after_initialize_and_training(rank):
    """NoisyTune after deepspeed.initialize reaches the optimizer's fp32 master copy (a step
    with lr 0 keeps it), and a patched ZeRO-3 model trains, patched before or after."""
    cfg = _config(3)
    for patch_first in (True, False):
        torch.manual_seed(2)
        model = _zero3_llama(cfg)
        if patch_first:
            fastnoise.patch(model, "neftune", 5.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        if not patch_first:
            fastnoise.patch(engine.module, "neftune", 5.0)
        assert fastnoise.is_patched(engine.module)
        full = _gathered(engine.module)
        fastnoise.noisytune_(engine.module, LAM, seed=SEED)
        noisy = _gathered(engine.module)
        names = [n for n, _ in engine.module.named_parameters()]
        _assert_all_equal(noisy, _expected(full, LAM, SEED), names, "after initialize")
        for p in engine.module.parameters():
            master = safe_get_local_fp32_param(p)
            assert torch.equal(master, p.ds_tensor.float()), "master copy not updated"
        engine.train()
        _train(engine, rank)
        _assert_all_equal(_gathered(engine.module), noisy, names, "lr-0 steps erased the noise")
        # noise in training mode only: the patched embedding's output differs from eval's
        emb = engine.module.get_input_embeddings()
        ids = _batch(rank, 9)["input_ids"]
        with deepspeed.zero.GatheredParameters([emb.weight], modifier_rank=None):
            plain = torch.nn.functional.embedding(ids, emb.weight).detach()
            emb.train()
            noisy_out = emb(ids).detach()  # noise: training mode with autograd on
        assert not torch.equal(noisy_out, plain) and torch.allclose(noisy_out, plain, atol=1.0)
        fastnoise.unpatch(engine.module)

    # real training: loss goes down with a patched ZeRO-3 model
    torch.manual_seed(3)
    model = _zero3_llama(cfg)
    fastnoise.patch(model, "symnoise", 1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    engine.train()
    losses = [_train(engine, rank, steps=1)[0] for _ in range(6)]  # the same batches again
    assert losses[-1] < losses[0], losses


def check_zero2(rank):
    """ZeRO-2: whole parameters, no special path; NoisyTune after initialize reaches the
    fp32 master copy; a patched model trains."""
    cfg = _config(2)
    torch.manual_seed(4)
    model = transformers.LlamaForCausalLM(_llama_config())
    fastnoise.patch(model, "neftune", 5.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    full = [p.detach().clone() for p in engine.module.parameters()]
    fastnoise.noisytune_(engine.module, LAM, seed=SEED)
    names = [n for n, _ in engine.module.named_parameters()]
    noisy = [p.detach().clone() for p in engine.module.parameters()]
    _assert_all_equal(noisy, _expected(full, LAM, SEED), names, "ZeRO-2 noisytune_")
    engine.train()
    _train(engine, rank)
    _assert_all_equal([p.detach() for p in engine.module.parameters()], noisy, names,
                      "ZeRO-2: lr-0 steps erased the noise")


def check_fsdp1_refused(rank):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    torch.manual_seed(5)
    for use_orig_params in (False, True):
        model = FSDP(torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)),
                     device_id=torch.device("cpu"), use_orig_params=use_orig_params)
        _expect_error(TypeError, "FSDP1", lambda: fastnoise.noisytune_(model, LAM, seed=SEED),
                      "noisytune_ on an FSDP1 model")
        flat = [p for p in model.parameters()]
        if not use_orig_params:
            _expect_error(TypeError, "flat parameter",
                          lambda: fastnoise.noisytune_(flat, LAM, seed=SEED),
                          "noisytune_ on an FSDP1 flat parameter")
        # the way that works: the full parameters, written back
        with FSDP.summon_full_params(model, writeback=True):
            full = [p.detach().clone() for p in model.parameters()]
            fastnoise.noisytune_(model, LAM, seed=SEED)
            want = _expected(full, LAM, SEED)
        with FSDP.summon_full_params(model):
            for p, w in zip(model.parameters(), want):
                assert torch.allclose(p, w, rtol=0, atol=1e-6), "summon + writeback"


def check_trainer_zero3(rank, out_dir):
    """FastNoiseCallback under Trainer with a ZeRO-3 config (Trainer's DeepSpeed path)."""
    from fastnoise.trainer import FastNoiseCallback

    # no "optimizer" entry: Trainer's torch AdamW (DeepSpeed's would JIT-build a C++ op)
    cfg = _config(3, train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto")
    args = transformers.TrainingArguments(
        output_dir=out_dir, max_steps=2, per_device_train_batch_size=2, report_to=[],
        save_strategy="no", learning_rate=1e-9, deepspeed=cfg, logging_steps=1)
    torch.manual_seed(6)
    model = transformers.AutoModelForCausalLM.from_config(_llama_config())  # zero.Init: args
    assert all(p.numel() == 0 for p in model.parameters()), "Trainer did not partition"
    full = _gathered(model)

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {k: v[0] for k, v in _batch(rank, i).items()}

    seen = []

    class Probe(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            seen.append(fastnoise.is_patched(model))

    callback = FastNoiseCallback("neftune", 5.0, noisytune_lam=LAM, seed=SEED)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(),
                                   callbacks=[callback, Probe()])
    result = trainer.train()
    assert seen == [True, True], seen
    assert torch.isfinite(torch.tensor(result.training_loss))
    got = _gathered(trainer.model)
    want = _expected(full, LAM, SEED)
    names = [n for n, _ in trainer.model.named_parameters()]
    for n, g, w, f in zip(names, got, want, full):
        # lr 1e-9: the weights are NoisyTune's result up to the training steps' tiny moves
        assert torch.allclose(g, w, rtol=0, atol=1e-6), n
        if f.numel() > 1 and float(f.double().std()) > 0:
            assert not torch.allclose(g, f, rtol=0, atol=1e-7), f"{n} not perturbed"
    # the log counts what NoisyTune changed, read over the ZeRO-3 partitions
    constant = sum(f.numel() > 1 and float(f.double().std()) == 0 for f in full)
    assert constant > 0  # the RMSNorm weights
    assert callback.logged["fastnoise/noisytune_skipped_std_0"] == constant, callback.logged
    assert callback.logged["fastnoise/noisytune_perturbed"] == len(full) - constant


def main():
    rank, phase = int(os.environ["RANK"]), sys.argv[1]
    deepspeed.init_distributed(dist_backend="gloo")
    checks = {
        "zero": [check_zero3_noisytune, check_zero3_errors,
                 check_zero3_after_initialize_and_training, check_zero2, check_fsdp1_refused],
        "trainer": [lambda r: check_trainer_zero3(r, tempfile.mkdtemp())],
    }[phase]
    for check in checks:
        check(rank)
        dist.barrier()
        print(f"rank {rank}: {getattr(check, '__name__', check)} passed", flush=True)
    print(f"rank {rank}: ok", flush=True)


if __name__ == "__main__":
    import worker_exit
    worker_exit.run(main)
