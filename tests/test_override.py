"""``override_hf_neftune`` as a full stand-in for transformers' stock NEFTune hook (issue
#22.2): every public name, a handle whose remove() unpatches, the attribute the stock hook
sets, and the peers' own NEFTune tests (transformers' TrainerNEFTuneTest, TRL's SFT NEFTune
tests) run with the override active, adapted only to local tiny models."""

import importlib
import math

import pytest
import torch

import fastnoise
import tiny_models as T

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from fastnoise.trainer import NEFTuneHandle  # noqa: E402

HOMES = ("transformers.integrations.neftune", "transformers.integrations",
         "transformers.trainer")


@pytest.fixture
def override():
    fastnoise.override_hf_neftune("neftune")
    yield
    assert fastnoise.restore_hf_neftune()


def _stock():
    stock = importlib.import_module(HOMES[0])
    return stock.activate_neftune, stock.deactivate_neftune


def test_every_public_name_is_replaced_and_restored():
    from transformers.integrations.neftune import activate_neftune as bound_before

    stock = _stock()
    fastnoise.override_hf_neftune("gaussian")
    try:
        for home in map(importlib.import_module, HOMES):
            assert home.activate_neftune is not stock[0], home.__name__
            assert home.deactivate_neftune is not stock[1], home.__name__
            assert home.activate_neftune is importlib.import_module(HOMES[0]).activate_neftune
        # what cannot be reached: a reference bound before the override (README)
        assert bound_before is stock[0]
        from transformers.integrations import activate_neftune as bound_after
        model = T.llama()
        with bound_after(model, 3.0) as handle:
            assert fastnoise.is_patched(model) and model.get_input_embeddings().noise == "gaussian"
        assert handle.model is None and not fastnoise.is_patched(model)
    finally:
        assert fastnoise.restore_hf_neftune()
    for home in map(importlib.import_module, HOMES):
        assert (home.activate_neftune, home.deactivate_neftune) == stock, home.__name__


def test_the_handle_behaves_like_the_stock_one(override):
    from transformers.integrations import activate_neftune, deactivate_neftune

    model = T.llama().train()
    emb = model.get_input_embeddings()
    handle = activate_neftune(model, 4.0)
    assert isinstance(handle, NEFTuneHandle)
    assert fastnoise.is_patched(model) and emb.neftune_noise_alpha == 4.0  # as the stock sets
    assert not emb._forward_hooks  # fused: no forward hook on the embedding
    handle.remove()
    assert not fastnoise.is_patched(model) and not hasattr(emb, "neftune_noise_alpha")
    handle.remove()  # again: a no-op, as RemovableHandle.remove
    # deactivate_neftune (ours, and the stock one after a restore mid-run) calls remove()
    handle = activate_neftune(model, 4.0)
    deactivate_neftune(model, handle)
    assert not fastnoise.is_patched(model) and not hasattr(emb, "neftune_noise_alpha")
    handle = activate_neftune(model, 4.0)
    _stock()[1](model, handle)
    assert not fastnoise.is_patched(model) and not hasattr(emb, "neftune_noise_alpha")
    # PEFT: the attribute lands where the stock hook puts it (the base model's embeddings)
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(T.llama(), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                          task_type="CAUSAL_LM"))
    handle = activate_neftune(lora, 2.0)
    assert lora.base_model.model.get_input_embeddings().neftune_noise_alpha == 2.0
    handle.remove()
    assert not fastnoise.is_patched(lora)


# --------------------------------------------------------------------------------------
# transformers' TrainerNEFTuneTest.test_neftune, adapted to a local tiny GPT-2
# --------------------------------------------------------------------------------------
class _RepeatDataset(torch.utils.data.Dataset):
    def __init__(self, x, length=16):
        self.x, self.length = x, length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return {"input_ids": self.x, "labels": self.x}


def test_transformers_trainer_neftune_test_with_the_override(override, tmp_path):
    from transformers.integrations.neftune import activate_neftune  # after the override

    config = transformers.GPT2Config(vocab_size=100, n_positions=128, n_embd=32, n_layer=3,
                                     n_head=4)
    tiny_gpt2 = transformers.GPT2LMHeadModel(config)
    x = torch.randint(0, 100, (128,))
    train_dataset = _RepeatDataset(x)
    args = transformers.TrainingArguments(str(tmp_path), learning_rate=1e-9, logging_steps=5,
                                          logging_nan_inf_filter=False,
                                          neftune_noise_alpha=0.4, report_to="none",
                                          use_cpu=True, max_steps=4)
    trainer = transformers.Trainer(tiny_gpt2, args, train_dataset=train_dataset)
    activate_neftune(trainer.model, trainer.args.neftune_noise_alpha)
    dummy_input = torch.LongTensor([[1, 0, 1]])
    emb1 = trainer.model.get_input_embeddings()(dummy_input)
    emb2 = trainer.model.get_input_embeddings()(dummy_input)
    assert not torch.allclose(emb1, emb2), "Neftune noise is not applied!"

    tiny_gpt2 = transformers.GPT2LMHeadModel(config)  # redefine the model
    trainer = transformers.Trainer(tiny_gpt2, args, train_dataset=train_dataset)
    trainer.train()  # trains without errors
    assert isinstance(trainer.neftune_hook_handle, NEFTuneHandle)
    _ = trainer.model(dummy_input)  # the forward works after training
    assert len(trainer.model.get_input_embeddings()._forward_hooks) == 0
    assert not fastnoise.is_patched(trainer.model)
    trainer.model.eval()
    emb1 = trainer.model.get_input_embeddings()(dummy_input)
    emb2 = trainer.model.get_input_embeddings()(dummy_input)
    torch.testing.assert_close(emb1, emb2)


# --------------------------------------------------------------------------------------
# TRL's SFT NEFTune tests (plain and PEFT), adapted to a local tiny Qwen2 and tokenizer
# --------------------------------------------------------------------------------------
def _tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"t{i}": i for i in range(T.VOCAB)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0",
                                                eos_token="t1")


def _text_dataset(n=12):
    datasets = pytest.importorskip("datasets")
    gen = torch.Generator().manual_seed(0)
    return datasets.Dataset.from_dict({"text": [
        " ".join(f"t{int(i)}" for i in torch.randint(2, T.VOCAB, (int(k),), generator=gen))
        for k in torch.randint(3, 9, (n,), generator=gen)]})


@pytest.mark.parametrize("peft_config", [False, True])
def test_trl_sft_neftune_test_with_the_override(peft_config, override, tmp_path):
    trl = pytest.importorskip("trl")
    from transformers.integrations.neftune import activate_neftune

    extra = {}
    if peft_config:
        peft = pytest.importorskip("peft")
        extra["peft_config"] = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                               task_type="CAUSAL_LM")
    # gradient checkpointing off, as in TRL's test (it adds its own forward hook)
    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2,
                         max_length=16, neftune_noise_alpha=5, packing=True, report_to="none",
                         use_cpu=True, save_strategy="no", gradient_checkpointing=False)
    trainer = trl.SFTTrainer(model=T.qwen2(), args=args, train_dataset=_text_dataset(),
                             processing_class=_tokenizer(), **extra)
    # TRL's `trainer.model = trainer._activate_neftune(trainer.model)`, transformers 5's way
    trainer.neftune_hook_handle = activate_neftune(trainer.model, 5, trainer.accelerator)
    if peft_config:
        assert type(trainer.model).__name__.startswith("PeftModel")
    trainer.model.train()
    torch.random.manual_seed(42)
    embeds_neftune = trainer.model.get_input_embeddings()(torch.LongTensor([[1, 0, 1]]))
    torch.random.manual_seed(24)
    embeds_neftune_2 = trainer.model.get_input_embeddings()(torch.LongTensor([[1, 0, 1]]))
    assert not torch.allclose(embeds_neftune, embeds_neftune_2)
    # TRL asserts `len(...get_input_embeddings()._forward_hooks) > 0` here: the stand-in
    # attaches no forward hook (the noise is in the embedding's own fused forward)
    assert fastnoise.is_patched(trainer.model)
    trainer.neftune_hook_handle.remove()
    assert not fastnoise.is_patched(trainer.model)
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    _ = trainer.model(torch.LongTensor([[1, 0, 1]]))  # the forward is not broken
    assert len(trainer.model.get_input_embeddings()._forward_hooks) == 0
    assert not fastnoise.is_patched(trainer.model)


@pytest.mark.parametrize("adapter", ["modules_to_save", "trainable_token_indices"])
def test_sft_with_trained_embeddings_under_the_override(adapter, override, tmp_path):
    """Issue #23 row 5: where the stock hook trains, so does the stand-in."""
    trl = pytest.importorskip("trl")
    peft = pytest.importorskip("peft")
    seen = []

    class Probe(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            seen.append(fastnoise.is_patched(model))

    extra = ({"modules_to_save": ["embed_tokens"]} if adapter == "modules_to_save"
             else {"trainable_token_indices": [3, 4, 5]})
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM", **extra)
    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2,
                         max_length=16, neftune_noise_alpha=5, packing=True, report_to="none",
                         use_cpu=True, save_strategy="no")
    trainer = trl.SFTTrainer(model=T.qwen2(), args=args, train_dataset=_text_dataset(),
                             processing_class=_tokenizer(), peft_config=config,
                             callbacks=[Probe()])
    result = trainer.train()
    assert seen == [True, True] and not fastnoise.is_patched(trainer.model)
    assert math.isfinite(result.training_loss)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=6, length=10):
        gen = torch.Generator().manual_seed(1)
        self.ids = torch.randint(2, T.VOCAB, (n, length), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].clone()
        labels[: i % 4] = -100
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "labels": labels}


def test_symnoise_override_with_label_smoothing_is_the_mean_of_the_pair(tmp_path):
    """The override checks the Trainer's loss and doubles the labels it smooths itself."""
    def run(override):
        torch.manual_seed(0)
        extra = {"neftune_noise_alpha": 0.0} if override else {}
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(override)), max_steps=2, per_device_train_batch_size=1,
            report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, seed=0,
            learning_rate=1e-2, label_smoothing_factor=0.1, **extra)

        def doubled(features):
            batch = transformers.default_data_collator(features)
            return batch if override else {k: torch.cat([v, v]) for k, v in batch.items()}

        trainer = transformers.Trainer(model=T.llama(), args=args, train_dataset=_Rows(),
                                       data_collator=doubled)
        trainer.train()
        return [(e["loss"], e["grad_norm"]) for e in trainer.state.log_history if "loss" in e]

    fastnoise.override_hf_neftune("symnoise")
    try:
        got = run(True)
    finally:
        fastnoise.restore_hf_neftune()
    torch.testing.assert_close(torch.tensor(got), torch.tensor(run(False)), rtol=2e-5,
                               atol=1e-6)
