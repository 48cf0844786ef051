"""One rank of tests/test_distributed.py (gloo, CPU, loopback). Exits non-zero on failure."""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import fastnoise

def gather(t):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


def check_rank_distinct_noise():
    torch.manual_seed(0)  # every rank seeded alike
    emb = fastnoise.NoisyEmbedding(40, 8).train()
    ids = torch.randint(0, 40, (2, 6))
    a, b = gather(emb(ids).detach())
    assert not torch.equal(a, b), "ranks drew the same noise"
    fastnoise.set_rank_distinct_noise(False)
    torch.manual_seed(1)
    a, b = gather(emb(ids).detach())
    fastnoise.set_rank_distinct_noise(True)
    assert torch.equal(a, b), "set_rank_distinct_noise(False) should give identical noise"


def check_noisytune_sharded_equals_unsharded():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(2)
    big = torch.randn(7, 5) * 3 + 100  # odd rows over 2 ranks; a large mean
    other = torch.randn(11)
    expect = [big.clone(), other.clone()]
    fastnoise.noisytune_(expect, 0.15, seed=9)
    for placements in ([Shard(0)], [Shard(1)], [Replicate()]):
        dt = distribute_tensor(big.clone(), mesh, placements)
        rest = other.clone()
        fastnoise.noisytune_([dt, rest], 0.15, seed=9)
        got = dt.full_tensor()
        tol = 1e-6 * float(big.std()) + 2e-5  # float32 rounding of the final add at ~100
        assert torch.allclose(got, expect[0], rtol=0, atol=tol), (placements, (got - expect[0]).abs().max())
        assert not torch.equal(got, big)
        assert torch.equal(rest, expect[1]), "the tensor after a sharded one moved"


def check_noisytune_seed_is_rank_0s():
    """Issue #23 row 11: ranks seeded differently still perturb their replicas alike (the
    drawn seed is rank 0's whenever a process group is up)."""
    torch.manual_seed(5)  # the same weights on every rank
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5))
    torch.manual_seed(300 + dist.get_rank())  # each rank its own torch seed
    before = [p.detach().clone() for p in model.parameters()]
    fastnoise.noisytune_(model, 0.15)
    for p, b in zip(model.parameters(), before):
        a, c = gather(p.detach())
        assert torch.equal(a, c), "replicas diverged after NoisyTune"
    assert not torch.equal(model[0].weight, before[0])


def check_unchanged_parameters_of_shards():
    """What NoisyTune leaves unchanged, read over the shards of a DTensor (collective)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from fastnoise.noisytune import unchanged_parameters

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    ones = torch.ones(5, 3)
    ones[4, 2] = 2.0  # not constant over the whole tensor, constant on rank 0's shard
    nan = torch.randn(5, 3)
    nan[4, 0] = float("nan")  # on rank 1's shard only
    tensors = [distribute_tensor(t, mesh, [Shard(0)])
               for t in (ones, torch.full((5, 3), 0.5), nan)]
    assert unchanged_parameters(tensors, 0.15) == [("tensors[1]", "std 0"),
                                                   ("tensors[2]", "not finite")]


def check_ddp_training():
    torch.manual_seed(3)
    model = nn.Sequential(fastnoise.NoisyEmbedding(50, 16, padding_idx=0), nn.Linear(16, 50))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    torch.manual_seed(100 + dist.get_rank())  # each rank its own data
    for _ in range(3):
        ids = torch.randint(0, 50, (4, 9))
        logits = ddp(ids)
        loss = nn.functional.cross_entropy(logits.reshape(-1, 50), ids.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    for p in model.parameters():
        a, b = gather(p.detach())
        assert torch.equal(a, b), "replicas diverged"


def _tiny_llama():
    import transformers

    torch.manual_seed(5)  # the same weights on every rank and in every variant
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


def _train(model, wrapped, steps=3):
    """Losses of a few SGD steps on rank-specific data (seeded alike in every variant)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(200 + dist.get_rank())
    model.train()
    losses = []
    for _ in range(steps):
        ids = torch.randint(1, 64, (2, 10), generator=gen)
        loss = wrapped(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def _full_params(model):
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
            for p in model.parameters()]


def _fsdp2(model, shard_embedding=False):
    from torch.distributed.fsdp import fully_shard

    if shard_embedding:
        fully_shard(model.model.embed_tokens)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def check_patch_with_fsdp2():
    """patch before or after fully_shard; noise aside (alpha 0) it trains like the unpatched
    sharded model; with noise the sharded embedding gets it."""
    from torch.distributed.fsdp import FSDPModule

    plain = _fsdp2(_tiny_llama())
    expect_losses = _train(plain, plain)
    expect = _full_params(plain)
    for order in ("before", "after", "before+embedding"):
        model = _tiny_llama()
        emb = model.get_input_embeddings()
        if order.startswith("before"):
            fastnoise.patch(model, "neftune", alpha=0.0)
            _fsdp2(model, shard_embedding=order.endswith("embedding"))
        else:
            _fsdp2(model)
            fastnoise.patch(model, "neftune", alpha=0.0)
        assert model.get_input_embeddings() is emb and fastnoise.is_patched(model)
        losses = _train(model, model)
        assert torch.allclose(losses, expect_losses, rtol=1e-5, atol=1e-6), (order, losses)
        for got, want in zip(_full_params(model), expect):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), order
        fastnoise.patch(model, "symnoise", alpha=5.0)  # noisy, symmetric: trains, finite
        assert torch.isfinite(_train(model, model, steps=1)).all(), order
        fastnoise.unpatch(model)
        assert not isinstance(emb, fastnoise.NoisyEmbedding), order
        assert isinstance(emb, FSDPModule) == order.endswith("embedding"), order
        assert torch.isfinite(_train(model, model, steps=1)).all(), order


def check_patch_with_ddp():
    """patch before or after DDP wrapping: alpha 0 trains like the unpatched DDP model."""
    ddp = nn.parallel.DistributedDataParallel
    plain = _tiny_llama()
    expect_losses = _train(plain, ddp(plain))
    expect = _full_params(plain)
    for order in ("before", "after"):
        model = _tiny_llama()
        if order == "before":
            fastnoise.patch(model, "neftune", alpha=0.0)
            wrapped = ddp(model)
        else:
            wrapped = ddp(model)
            fastnoise.patch(wrapped, "neftune", alpha=0.0)  # the DDP wrapper: its module
        assert fastnoise.is_patched(wrapped) and fastnoise.is_patched(model)
        losses = _train(model, wrapped)
        assert torch.allclose(losses, expect_losses, rtol=1e-5, atol=1e-6), (order, losses)
        for got, want in zip(_full_params(model), expect):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), order
            a, b = gather(got)
            assert torch.equal(a, b), "replicas diverged"
        fastnoise.unpatch(wrapped)
        assert not fastnoise.is_patched(model)


def main():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['PORT']}",
                            rank=int(sys.argv[1]), world_size=2)
    check_rank_distinct_noise()
    check_noisytune_sharded_equals_unsharded()
    check_noisytune_seed_is_rank_0s()
    check_unchanged_parameters_of_shards()
    check_ddp_training()
    check_patch_with_ddp()
    check_patch_with_fsdp2()
    print(f"rank {sys.argv[1]}: fsdp2 and ddp patch checks passed", flush=True)
    dist.barrier()  # both ranks done before either tears gloo down
    dist.destroy_process_group()
    print(f"rank {sys.argv[1]}: ok", flush=True)


if __name__ == "__main__":
    import worker_exit
    worker_exit.run(main)
