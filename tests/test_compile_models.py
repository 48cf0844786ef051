"""torch.compile(fullgraph=True) of patched real transformers models (issue #22.1): no graph
break, gradients equal eager (the same seed draws the same noise), no recompile over new
lengths, and Trainer(torch_compile=True) with the callback or the override."""

import pytest
import torch
from torch._dynamo.utils import counters

import fastnoise
import tiny_models as T

transformers = pytest.importorskip("transformers")

def _inputs(kind, length=10):
    ids = torch.randint(1, T.VOCAB, (2, length))
    inputs = {"input_ids": ids, "labels": ids.clone()}
    if kind == "mask":
        mask = torch.ones_like(ids)
        mask[1, length - 3:] = 0
        inputs.update(attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    else:  # packed: position_ids restart where a new sequence starts
        pos = torch.arange(length).repeat(2, 1)
        pos[0, 4:] -= 4
        inputs["position_ids"] = pos
    return inputs


def _compiled_matches_eager(name, method, kind, backend, eval_too=True):
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = T.no_dropout(getattr(T, name)()).train()
    fastnoise.patch(model, method, alpha=5.0, use_attention_mask=kind == "mask")
    inputs = _inputs(kind)
    torch.manual_seed(1)
    loss = model(**inputs).loss
    loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    torch.manual_seed(1)  # the same draw: the same noise
    got = compiled(**inputs).loss
    got.backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(got, loss, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[n], rtol=1e-4, atol=1e-6, msg=n)
    a, b = compiled(**inputs).loss, compiled(**inputs).loss
    assert not torch.equal(a, b)  # every call draws new noise, also compiled
    if not eval_too:  # (eval mode compiles the frames again)
        return
    model.eval()
    with torch.no_grad():  # eval: exactly the unpatched model
        clean = compiled(**inputs).logits
    fastnoise.unpatch(model)
    with torch.no_grad():
        torch.testing.assert_close(clean, model(**inputs).logits, rtol=1e-5, atol=1e-6)


# every model with every method once, each model and method with a mask and with packing
# (each case ~10 s on 2 cores): two on every run, the rest marked slow
FAST = [("llama", "neftune", "mask"), ("qwen2", "symnoise", "packed")]
GRID = [("llama", "neftune", "mask"), ("llama", "gaussian", "packed"),
        ("llama", "symnoise", "mask"), ("qwen2", "neftune", "packed"),
        ("qwen2", "gaussian", "mask"), ("qwen2", "symnoise", "packed"),
        ("gemma", "neftune", "mask"), ("gemma", "gaussian", "packed"),
        ("gemma", "symnoise", "mask")]


@pytest.mark.parametrize("name,method,kind", FAST)
def test_patched_model_compiles_fullgraph_like_eager(name, method, kind):
    _compiled_matches_eager(name, method, kind, "aot_eager", eval_too=False)


@pytest.mark.slow
@pytest.mark.parametrize("name,method,kind", [c for c in GRID if c not in FAST])
def test_patched_model_compiles_fullgraph_like_eager_grid(name, method, kind):
    _compiled_matches_eager(name, method, kind, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("name,method,kind", [
    ("llama", "symnoise", "mask"), ("qwen2", "neftune", "packed"),
    ("gemma", "gaussian", "mask"), ("gemma", "symnoise", "packed")])
def test_patched_model_compiles_fullgraph_with_inductor(name, method, kind):
    _compiled_matches_eager(name, method, kind, "inductor")


def _graphs_over_lengths(method, kind, lengths=(6, 7, 9)):
    """Graphs after each length of a dynamic compile (method None: the unpatched model)."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = T.llama().train()
    if method is not None:
        fastnoise.patch(model, method, use_attention_mask=kind == "mask")
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=True)
    graphs = []
    for length in lengths:
        compiled(**_inputs(kind, length)).loss.backward()
        graphs.append(counters["stats"]["unique_graphs"])
    return graphs


@pytest.mark.parametrize("method,kind", [
    ("symnoise", "mask"), pytest.param("neftune", "packed", marks=pytest.mark.slow)])
def test_new_lengths_do_not_recompile(method, kind):
    """The hooks and the forward are separate frames: the ModelCall they share holds
    tensors, no sizes, so the forward stays dynamic (a size would be a constant there)."""
    graphs = _graphs_over_lengths(method, kind)
    assert graphs == [graphs[0]] * len(graphs), graphs


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mask", "packed"])
def test_no_recompile_beyond_the_unpatched_model(kind):
    plain = _graphs_over_lengths(None, kind)
    for method in ("neftune", "symnoise"):
        patched = _graphs_over_lengths(method, kind)
        assert patched[-1] - patched[0] == plain[-1] - plain[0], (method, patched, plain)


# --------------------------------------------------------------------------------------
# Trainer(torch_compile=True)
# --------------------------------------------------------------------------------------
class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=8, length=12):
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, T.VOCAB, (n, length), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        mask = torch.ones_like(self.ids[i])
        mask[-(i % 3):] = 0 if i % 3 else 1
        return {"input_ids": self.ids[i], "attention_mask": mask,
                "labels": self.ids[i].masked_fill(mask == 0, -100)}


@pytest.mark.parametrize("how", ["callback", "override"])
def test_trainer_torch_compile_trains(how, tmp_path):
    pytest.importorskip("accelerate")
    from fastnoise.trainer import FastNoiseCallback

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = T.llama()
    before = model.get_input_embeddings().weight.detach().clone()
    seen = []

    class Probe(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            seen.append(fastnoise.is_patched(model))

    extra = {"neftune_noise_alpha": 5.0} if how == "override" else {}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
        use_cpu=True, save_strategy="no", torch_compile=True,
        torch_compile_backend="aot_eager", learning_rate=1e-2, **extra)
    callbacks = [Probe()]
    if how == "callback":
        callbacks.append(FastNoiseCallback("symnoise", alpha=5.0, use_attention_mask=True))
    else:
        fastnoise.override_hf_neftune("neftune", use_attention_mask=True)
    try:
        result = transformers.Trainer(model=model, args=args, train_dataset=_Rows(),
                                      callbacks=callbacks).train()
    finally:
        fastnoise.restore_hf_neftune()
    assert seen == [True, True] and not fastnoise.is_patched(model)
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(model.get_input_embeddings().weight.detach(), before)
    assert counters["stats"]["unique_graphs"] > 0  # it ran compiled
