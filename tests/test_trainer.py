"""FastNoiseCallback with a real transformers Trainer, and the example script."""

import importlib.util
import math
import pathlib

import pytest
import torch

import fastnoise

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from fastnoise.trainer import FastNoiseCallback  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16, length=12, vocab=64):
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, vocab, (n, length), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "labels": self.ids[i]}


def _model():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


class _Probe(transformers.TrainerCallback):
    """Records whether the embedding was patched at each step."""

    def __init__(self):
        self.patched = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.patched.append(fastnoise.is_patched(model))


@pytest.mark.parametrize("method", ["neftune", "symnoise"])
def test_trainer_patches_during_training_only(method, tmp_path):
    torch.manual_seed(0)
    model = _model()
    original = model.get_input_embeddings()
    before = original.weight.detach().clone()
    norm_before = model.model.norm.weight.detach().clone()
    probe = _Probe()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3,
                                          per_device_train_batch_size=4, report_to=[],
                                          use_cpu=True, save_strategy="no", logging_steps=1,
                                          learning_rate=1e-9)
    callback = FastNoiseCallback(method, alpha=5.0, noisytune_lam=0.15, seed=1)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(),
                                   callbacks=[callback, probe])
    result = trainer.train()
    assert probe.patched == [True, True, True]
    assert model.get_input_embeddings() is original and not fastnoise.is_patched(model)
    assert math.isfinite(result.training_loss)
    # NoisyTune ran once, before the first step: the weights moved by ~lam*std, not by lr
    moved = (original.weight.detach() - before).abs().max()
    assert 0 < moved <= 0.5 * 0.15 * before.std() * 1.01 + 1e-6
    assert torch.equal(model.model.norm.weight.detach(), norm_before)  # std 0: unchanged


def test_callback_refuses_double_noise_before_changing_anything(tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[],
                                          use_cpu=True, neftune_noise_alpha=5.0)
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    callback = FastNoiseCallback("neftune", noisytune_lam=0.15)
    with pytest.raises(ValueError, match="neftune_noise_alpha"):
        transformers.Trainer(model=model, args=args, train_dataset=_Tokens(),
                             callbacks=[callback])
    # added after the Trainer was built: train begin refuses before NoisyTune or the patch
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens())
    trainer.add_callback(callback)
    with pytest.raises(ValueError, match="neftune_noise_alpha"):
        trainer.train()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert not fastnoise.is_patched(model)


def test_callback_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        FastNoiseCallback("noise")
    with pytest.raises(ValueError, match="alpha"):
        FastNoiseCallback("neftune", alpha=-1)
    with pytest.raises(ValueError, match="noisytune_lam"):
        FastNoiseCallback("neftune", noisytune_lam=float("nan"))
    with pytest.raises(TypeError, match="seed"):
        FastNoiseCallback("neftune", seed=1.5)
    with pytest.raises(TypeError, match="use_attention_masks"):
        FastNoiseCallback("neftune", use_attention_masks=True)
    with pytest.raises(ValueError, match="noise kind"):
        FastNoiseCallback("neftune", noise="laplace")
    with pytest.raises(ValueError, match="backend"):
        FastNoiseCallback("neftune", backend="cudaa")


def test_finetune_tiny_example_runs():
    spec = importlib.util.spec_from_file_location("finetune_tiny",
                                                  ROOT / "examples" / "finetune_tiny.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--steps", "3", "--batch", "4",
                            "--methods", "none,neftune,symnoise,noisytune+neftune"])
    assert set(results) == {"none", "neftune", "symnoise", "noisytune+neftune"}
    for final, held_out, speed in results.values():
        assert math.isfinite(final) and math.isfinite(held_out) and speed > 0


def test_trl_sft_trainer(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    torch.manual_seed(0)
    model = _model()
    original = model.get_input_embeddings()
    ids = _Tokens().ids
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist()})
    probe = _Probe()
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                         report_to=[], use_cpu=True, save_strategy="no", packing=False)
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"t{i}": i for i in range(64)}  # a word-level tokenizer built here: no download
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0",
                                                     eos_token="t1")
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data,
                             processing_class=tokenizer,
                             callbacks=[FastNoiseCallback("neftune", alpha=5.0), probe])
    result = trainer.train()
    assert probe.patched == [True, True]
    assert model.get_input_embeddings() is original
    assert math.isfinite(result.training_loss)


# --------------------------------------------------------------------------------------
# SymNoise: the loss is the mean over the pair, as the unpatched model on the doubled batch
# --------------------------------------------------------------------------------------
class _Ragged(torch.utils.data.Dataset):
    """Rows with different label counts (so num_items_in_batch matters)."""

    def __init__(self, n=8, length=12, vocab=64):
        gen = torch.Generator().manual_seed(1)
        self.ids = torch.randint(2, vocab, (n, length), generator=gen)
        self.keep = torch.randint(4, length + 1, (n,), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].clone()
        labels[: len(labels) - int(self.keep[i])] = -100  # a prompt that is not trained on
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "labels": labels}


def _doubled(collate):
    def collate_twice(features):
        batch = collate(features)
        return {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}
    return collate_twice


def _sft_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"t{i}": i for i in range(64)}  # a word-level tokenizer built here: no download
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0",
                                                eos_token="t1")


def _train_logs(kind, tmp_path, *, patched, accumulation):
    """(loss, grad_norm) per step of a 3-step run; ``patched``: SymNoise at alpha 0 via the
    callback; else the unpatched model fed the explicitly doubled batch."""
    torch.manual_seed(0)
    model = _model()
    common = dict(output_dir=str(tmp_path / f"{kind}{patched}{accumulation}"), max_steps=3,
                  per_device_train_batch_size=2, gradient_accumulation_steps=accumulation,
                  report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                  learning_rate=1e-2, seed=0)
    callbacks = [FastNoiseCallback("symnoise", alpha=0.0)] if patched else []
    if kind == "trainer":
        collate = transformers.default_data_collator
        trainer = transformers.Trainer(
            model=model, args=transformers.TrainingArguments(**common),
            train_dataset=_Ragged(), data_collator=collate if patched else _doubled(collate),
            callbacks=callbacks)
    else:
        trl = pytest.importorskip("trl")
        datasets = pytest.importorskip("datasets")
        data = _Ragged()
        rows = {"input_ids": [data.ids[i, : 4 + i].tolist() for i in range(len(data))]}
        collate = trl.trainer.sft_trainer.DataCollatorForLanguageModeling(pad_token_id=0)
        trainer = trl.SFTTrainer(
            model=model, args=trl.SFTConfig(**common, packing=False),
            train_dataset=datasets.Dataset.from_dict(rows), processing_class=_sft_tokenizer(),
            data_collator=collate if patched else _doubled(collate), callbacks=callbacks)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    return [(entry["loss"], entry["grad_norm"]) for entry in logs]


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("kind", ["trainer", "sft"])
def test_symnoise_trains_on_the_mean_of_the_pair(kind, accumulation, tmp_path):
    got = _train_logs(kind, tmp_path, patched=True, accumulation=accumulation)
    expect = _train_logs(kind, tmp_path, patched=False, accumulation=accumulation)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expect), rtol=2e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# Logs, neftune_noise_alpha, DPO
# --------------------------------------------------------------------------------------
class _Tracker(transformers.TrainerCallback):
    """What a tracker (wandb, TensorBoard: callbacks too) is handed through on_log."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_callback_logs_once_through_the_trainer(tmp_path):
    torch.manual_seed(0)
    model = _model()
    tracker = _Tracker()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2,
                                          per_device_train_batch_size=4, report_to=[],
                                          use_cpu=True, save_strategy="no", logging_steps=1)
    callback = FastNoiseCallback("gaussian", alpha=3.0, noisytune_lam=0.1, seed=2)
    transformers.Trainer(model=model, args=args, train_dataset=_Tokens(),
                         callbacks=[tracker, callback]).train()
    ours = [logs for logs in tracker.logs if any(k.startswith("fastnoise/") for k in logs)]
    assert len(ours) == 1
    assert ours[0]["fastnoise/method"] == "gaussian" and ours[0]["fastnoise/alpha"] == 3.0
    assert ours[0]["fastnoise/backend"] in fastnoise.available_backends("cpu")
    assert ours[0]["fastnoise/noisytune_lambda"] == 0.1
    # RMSNorm weights are ones at init (std 0): NoisyTune leaves them, and says so
    norms = sum("norm" in n for n, _ in model.named_parameters())
    assert norms == 3
    assert ours[0]["fastnoise/noisytune_perturbed"] == len(
        {id(p) for p in model.parameters()}) - norms
    assert ours[0]["fastnoise/noisytune_skipped_std_0"] == norms
    assert ours[0]["fastnoise/noisytune_skipped_numel_lt_2"] == 0
    assert ours[0]["fastnoise/noisytune_skipped_not_finite"] == 0
    assert callback.logged == {k: v for k, v in ours[0].items() if k.startswith("fastnoise/")}


class _EmbeddingProbe(transformers.TrainerCallback):
    """At each step: is the model fastnoise-patched, is the stock hook attached."""

    def __init__(self):
        self.steps = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        emb = model.get_input_embeddings()
        stock = any(getattr(hook, "__name__", "") == "neftune_post_forward_hook"
                    for hook in emb._forward_hooks.values())
        self.steps.append((fastnoise.is_patched(model), getattr(emb, "alpha", None), stock))


class _Packed(torch.utils.data.Dataset):
    """One packed row of three examples (lengths 4, 6, 2): position_ids restart at 0."""

    position_ids = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1])

    def __len__(self):
        return 2

    def __getitem__(self, i):
        ids = torch.arange(2, 14) + i
        return {"input_ids": ids, "position_ids": self.position_ids, "labels": ids}


def test_override_hf_neftune_and_restore(tmp_path):
    def run(probe, hook=None):
        torch.manual_seed(0)
        model = _model()
        if hook is not None:
            model.get_input_embeddings().register_forward_hook(hook)
        args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2,
                                              per_device_train_batch_size=1, report_to=[],
                                              use_cpu=True, save_strategy="no",
                                              neftune_noise_alpha=4.0)
        transformers.Trainer(model=model, args=args, train_dataset=_Packed(),
                             callbacks=[probe]).train()
        return model

    noise = []

    def record(module, args, output):
        if module.training:
            noise.append((output - torch.nn.functional.embedding(args[0], module.weight)).detach())

    fastnoise.override_hf_neftune("neftune", noise="bernoulli")  # ±mag: |noise| shows L
    try:
        probe = _EmbeddingProbe()
        model = run(probe, record)
        assert probe.steps == [(True, 4.0, False)] * 2  # fastnoise's, not the stock hook
        assert not fastnoise.is_patched(model)  # removed at the end of training
        d = 32
        lengths = torch.tensor([4.0] * 4 + [6.0] * 6 + [2.0] * 2)  # each packed sequence's L
        expect = (4.0 / (lengths * d).sqrt())[:, None].expand(12, d)
        torch.testing.assert_close(noise[0][0].abs(), expect, rtol=1e-5, atol=1e-6)
        callback = FastNoiseCallback("neftune")
        with pytest.raises(ValueError, match="override_hf_neftune"):
            callback._check_conflict(transformers.TrainingArguments(
                output_dir=str(tmp_path), neftune_noise_alpha=1.0, use_cpu=True))
    finally:
        assert fastnoise.restore_hf_neftune()
    assert not fastnoise.restore_hf_neftune()
    probe = _EmbeddingProbe()
    run(probe)
    assert probe.steps == [(False, None, True)] * 2  # the stock hook is back


def _dpo_dataset():
    datasets = pytest.importorskip("datasets")
    gen = torch.Generator().manual_seed(3)

    def words(n):
        return " ".join(f"t{int(i)}" for i in torch.randint(2, 64, (n,), generator=gen))
    return datasets.Dataset.from_dict({"prompt": [words(5) for _ in range(4)],
                                       "chosen": [words(4) for _ in range(4)],
                                       "rejected": [words(3) for _ in range(4)]})


@pytest.mark.parametrize("reference", ["peft", "ref_model"])
def test_dpo_reference_pass_is_noise_free(reference, tmp_path):
    trl = pytest.importorskip("trl")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model, ref_model = _model(), None
    if reference == "peft":
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                           task_type="CAUSAL_LM"))
    else:
        ref_model = _model()
        ref_model.load_state_dict(model.state_dict())
    calls = []

    def record(module, args, output):  # on the policy's embedding (the ref pass too, for PEFT)
        clean = torch.nn.functional.embedding(args[0], module.weight)
        calls.append((torch.is_grad_enabled(), float((output - clean).abs().max())))

    model.get_input_embeddings().register_forward_hook(record)
    reference_model = model if ref_model is None else ref_model
    refs = []

    def record_reference(module, args, kwargs, output):  # the reference pass: no autograd
        if not torch.is_grad_enabled():
            refs.append(({k: v.clone() if isinstance(v, torch.Tensor) else v
                          for k, v in kwargs.items()}, output.log_probs.clone()))

    handle = reference_model.register_forward_hook(record_reference, with_kwargs=True)
    args = trl.DPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                         report_to=[], use_cpu=True, save_strategy="no", learning_rate=0.0)
    trainer = trl.DPOTrainer(model=model, ref_model=ref_model, args=args,
                             train_dataset=_dpo_dataset(), processing_class=_sft_tokenizer(),
                             callbacks=[FastNoiseCallback("neftune", alpha=5.0)])
    trainer.train()
    policy = [noise for grad, noise in calls if grad]
    assert policy and min(policy) > 0  # the policy passes get noise
    if reference == "peft":
        ref_calls = [noise for grad, noise in calls if not grad]
        assert ref_calls and max(ref_calls) == 0  # the reference pass (same module) does not
    handle.remove()
    assert len(refs) == 2
    assert not fastnoise.is_patched(model)
    for kwargs, log_probs in refs:  # the reference log-probs are the noise-free ones (lr 0)
        with torch.no_grad():
            if reference == "peft":
                with model.disable_adapter():
                    again = model(**kwargs).log_probs
            else:
                again = ref_model(**kwargs).log_probs
        torch.testing.assert_close(log_probs, again, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------
# SymNoise under trainers that compute the loss outside the model (issue #23 rows 7, 8)
# --------------------------------------------------------------------------------------
def _smoothed_logs(tmp_path, *, patched, batch):
    """(loss, grad_norm) per step with label smoothing: Trainer pops the labels and smooths
    the loss itself, from the model's logits."""
    torch.manual_seed(0)
    model = _model()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / f"ls{patched}{batch}"), max_steps=3,
        per_device_train_batch_size=batch, report_to=[], use_cpu=True, save_strategy="no",
        logging_steps=1, learning_rate=1e-2, seed=0, label_smoothing_factor=0.1)
    collate = transformers.default_data_collator
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_Ragged(),
        data_collator=collate if patched else _doubled(collate),
        callbacks=[FastNoiseCallback("symnoise", alpha=0.0)] if patched else [])
    smoother = trainer.label_smoother
    trainer.train()
    assert trainer.label_smoother is smoother  # the run's wrapper is gone
    return [(e["loss"], e["grad_norm"]) for e in trainer.state.log_history if "loss" in e]


@pytest.mark.parametrize("batch", [1, 2])
def test_symnoise_with_label_smoothing_is_the_mean_of_the_pair(batch, tmp_path):
    got = _smoothed_logs(tmp_path, patched=True, batch=batch)
    expect = _smoothed_logs(tmp_path, patched=False, batch=batch)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expect), rtol=2e-5, atol=1e-6)


def _preference_run(kind, tmp_path, method):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    torch.manual_seed(0)
    model, ref_model = _model(), _model()
    ref_model.load_state_dict(model.state_dict())
    common = dict(output_dir=str(tmp_path / f"{kind}{method}"), max_steps=2,
                  per_device_train_batch_size=2, report_to=[], use_cpu=True,
                  save_strategy="no", logging_steps=1, learning_rate=1e-3, seed=0)
    callbacks = [FastNoiseCallback(method, alpha=0.0)] if method else []
    if kind == "dpo":
        trainer = trl.DPOTrainer(model=model, ref_model=ref_model, args=trl.DPOConfig(**common),
                                 train_dataset=_dpo_dataset(),
                                 processing_class=_sft_tokenizer(), callbacks=callbacks)
    else:
        rows = _dpo_dataset()
        data = datasets.Dataset.from_dict({
            "prompt": list(rows["prompt"]) * 2,
            "completion": list(rows["chosen"]) + list(rows["rejected"]),
            "label": [True] * len(rows) + [False] * len(rows)})
        trainer = trl.KTOTrainer(model=model, ref_model=ref_model, args=trl.KTOConfig(**common),
                                 train_dataset=data,
                                 processing_class=_sft_tokenizer(), callbacks=callbacks)
    trainer.train()
    return [e for e in trainer.state.log_history if "loss" in e]


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_symnoise_under_dpo_and_kto_is_the_mean_of_the_pair(kind, tmp_path):
    """TRL folds nothing itself: patch folds the fused per-token outputs of the pair to
    their mean (is_top1 stays boolean, for DPO's accuracy `&`), so at alpha 0 the losses and
    metrics are the unpatched run's."""
    got = _preference_run(kind, tmp_path, "symnoise")
    expect = _preference_run(kind, tmp_path, None)
    assert len(got) == len(expect) == 2
    for g, e in zip(got, expect):
        for key in ("loss", "grad_norm", "mean_token_accuracy", "rewards/chosen"):
            if key in e:
                assert g[key] == pytest.approx(e[key], rel=2e-5, abs=1e-6), key


@pytest.mark.parametrize("kind", ["orpo", "cpo"])
def test_symnoise_under_a_trainer_that_splits_logits_itself_is_refused(kind, tmp_path):
    """ORPO and CPO split the model's logits into chosen / rejected by batch index."""
    module = pytest.importorskip(f"trl.experimental.{kind}")
    name = {"orpo": "ORPO", "cpo": "CPO"}[kind]
    config, trainer_cls = getattr(module, f"{name}Config"), getattr(module, f"{name}Trainer")
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    args = config(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                  report_to=[], use_cpu=True, save_strategy="no")
    trainer = trainer_cls(model=model, args=args, train_dataset=_dpo_dataset(),
                          processing_class=_sft_tokenizer(),
                          callbacks=[FastNoiseCallback("symnoise", noisytune_lam=0.1)])
    with pytest.raises(ValueError, match=f"{name}Trainer"):
        trainer.train()
    assert not fastnoise.is_patched(model)  # refused before NoisyTune or the patch
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_callback_runs_noisytune_on_its_backend(tmp_path, monkeypatch):
    """FastNoiseCallback(backend=...) runs NoisyTune on that backend too, not on "auto"."""
    from fastnoise import backends

    calls = []

    class Spy(backends.ReferenceBackend):
        def noisytune_(self, tensors, *args, **kwargs):
            calls.append(len(tensors))
            return super().noisytune_(tensors, *args, **kwargs)

    monkeypatch.setitem(backends._REGISTRY, "reference", Spy())
    backends.clear_cache()
    torch.manual_seed(0)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1,
                                          per_device_train_batch_size=4, report_to=[],
                                          use_cpu=True, save_strategy="no")
    callback = FastNoiseCallback("neftune", alpha=1.0, noisytune_lam=0.1, seed=3,
                                 backend="reference")
    transformers.Trainer(model=_model(), args=args, train_dataset=_Tokens(),
                         callbacks=[callback]).train()
    assert calls and sum(calls) > 0
    backends.clear_cache()
