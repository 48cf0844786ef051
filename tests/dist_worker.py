"""One rank of tests/test_distributed.py (gloo, CPU, loopback). Exits non-zero on failure."""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import fastnoise
from fastnoise.backends import resolve_backend

if "stds" not in __import__("inspect").signature(
        resolve_backend("auto", "cpu", torch.float32, op="noisytune").noisytune_).parameters:
    # until this checkout's compiled CPU backend takes given stds (C5, the sharded path's
    # fused route), "auto" runs NoisyTune on the reference
    fastnoise.backends.AUTO_ORDER["cpu"]["noisytune"] = ("reference",)
    fastnoise.backends.clear_cache()


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


def main():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['PORT']}",
                            rank=int(sys.argv[1]), world_size=2)
    check_rank_distinct_noise()
    check_noisytune_sharded_equals_unsharded()
    check_ddp_training()
    dist.barrier()  # both ranks done before either tears gloo down
    dist.destroy_process_group()
    print(f"rank {sys.argv[1]}: ok", flush=True)


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        import traceback
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    # skip interpreter teardown: gloo's C++ statics can abort at exit once the peer is gone
    sys.stdout.flush()
    os._exit(0)
