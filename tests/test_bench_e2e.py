"""The training-step bench (python -m fastnoise bench --e2e): every variant builds and steps."""

import pytest
import torch

pytest.importorskip("transformers")

import fastnoise  # noqa: E402
from fastnoise import bench, bench_e2e  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses; .ci/run runs them (-m 'not slow' skips)

TINY = dict(model=dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1),
            batch=2, length=8, dtype="float32")


VARIANTS = list(dict.fromkeys((impl, run) for _, impl, run in bench_e2e.variants()))


@pytest.mark.parametrize("impl,run", VARIANTS)
def test_every_variant_takes_a_training_step(impl, run):
    step, model = bench_e2e._build_step(torch.device("cpu"), TINY, run, impl)
    before = [p.detach().clone() for p in model.parameters()]
    step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert fastnoise.is_patched(model) == (impl == "fastnoise")
    assert len(VARIANTS) == 7  # no noise, then a peer and fastnoise per method


def test_cli_flag_and_rows_in_the_bench_format(tmp_path):
    results = [bench.Result("train step/neftune x", "hf_hook", 2.0, 0, 10.0),
               bench.Result("train step/neftune x", "fastnoise[cpu]", 1.0, 0, 9.0)]
    bench._derive(results, copy_gbps=float("inf"))
    assert results[1].speedups == {"hf_hook": 2.0}
    bench.write_csv(results, str(tmp_path / "e2e.csv"))
    assert "train step/neftune x,fastnoise[cpu]" in (tmp_path / "e2e.csv").read_text()
    with pytest.raises(SystemExit):
        bench.main(["--e2e", "--help"])
