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


def test_callback_refuses_double_noise(tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[],
                                          use_cpu=True, neftune_noise_alpha=5.0)
    trainer = transformers.Trainer(model=_model(), args=args, train_dataset=_Tokens(),
                                   callbacks=[FastNoiseCallback("neftune")])
    with pytest.raises(ValueError, match="neftune_noise_alpha"):
        trainer.train()


def test_callback_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        FastNoiseCallback("noise")
    with pytest.raises(ValueError, match="alpha"):
        FastNoiseCallback("neftune", alpha=-1)


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
