"""``patch`` on every model family and wrapper people train (issue #23): tiny models built
from configs, checked against the unpatched model on the explicitly doubled batch (SymNoise
at alpha 0) and against the noise each lookup gets (±1 noise shows the scale's L)."""

import copy
import io
import pickle

import pytest
import torch

import fastnoise
import tiny_models as T

transformers = pytest.importorskip("transformers")


def _double(batch):
    return {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _padded_batch(name, batch=2, length=10, left=False):
    ids = torch.randint(3, T.VOCAB - 1, (batch, length))
    mask = torch.ones_like(ids)
    if left:
        mask[1, :4] = 0  # left padding (GPT-2 style generation batches)
    else:
        mask[1, 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    if name == "bert_classifier":
        labels = torch.randint(0, 3, (batch,))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --------------------------------------------------------------------------------------
# Rows 1, 2 and their siblings: the pair is the model's own doubled batch
# --------------------------------------------------------------------------------------
PAIR_MODELS = dict(T.DECODERS, **T.ENCODERS, bert_classifier=T.bert_classifier)


@pytest.mark.parametrize("name", sorted(PAIR_MODELS))
def test_symnoise_pair_is_the_unpatched_model_on_the_doubled_batch(name):
    """alpha 0: the patched model's logits and loss are the unpatched model's on the doubled
    batch, whatever the model builds itself from the ids (BERT/RoBERTa token types and
    positions, GPT-2's mask reshaped with the ids' batch size; left padding)."""
    torch.manual_seed(0)
    model = T.no_dropout(PAIR_MODELS[name]()).train()
    batch = _padded_batch(name, left=name == "gpt2")
    expect = model(**_double(batch))
    fastnoise.patch(model, "symnoise", alpha=0.0)
    got = model(**batch)
    assert got.logits.shape[0] == 4
    torch.testing.assert_close(got.logits, expect.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.loss, expect.loss, rtol=1e-6, atol=1e-7)
    fastnoise.patch(model, "symnoise", alpha=5.0)  # with noise: trains, finite
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and model.get_input_embeddings().weight.grad is not None


@pytest.mark.parametrize("mode", ["use_cache=False", "gradient_checkpointing"])
def test_gpt2_symnoise_without_cache_and_with_checkpointing(mode):
    torch.manual_seed(0)
    model = T.no_dropout(T.gpt2()).train()
    batch = _padded_batch("gpt2", left=True)
    extra = {"use_cache": False} if mode == "use_cache=False" else {}
    if mode == "gradient_checkpointing":
        model.gradient_checkpointing_enable()
    expect = model(**_double(batch), **extra).loss
    fastnoise.patch(model, "symnoise", alpha=0.0)
    got = model(**batch, **extra).loss
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-7)
    got.backward()


def test_symnoise_pair_noise_is_plus_and_minus_the_same_draw():
    torch.manual_seed(0)
    model = T.no_dropout(T.roberta()).train()
    fastnoise.patch(model, "symnoise", alpha=5.0)
    seen, handle = T.record_noise(model.get_input_embeddings())
    batch = _padded_batch("roberta")
    model(**batch)
    handle.remove()
    ids, noise = seen[0]
    assert ids.shape[0] == 4 and torch.equal(ids[:2], ids[2:])  # the model got the ids twice
    torch.testing.assert_close(noise[:2], -noise[2:], rtol=0, atol=1e-6)
    torch.testing.assert_close(noise.abs(), torch.full_like(noise, float(T.magnitudes(10))),
                               rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# Row 12 (GPT-2's token types) and row 9 (LLaVA): only the model's input lookup is noisy
# --------------------------------------------------------------------------------------
def test_gpt2_token_type_lookup_gets_no_noise():
    torch.manual_seed(0)
    model = T.no_dropout(T.gpt2()).train()
    fastnoise.patch(model, "neftune", noise="bernoulli", alpha=5.0)
    seen, handle = T.record_noise(model.get_input_embeddings())
    batch = _padded_batch("gpt2")
    types = torch.randint(0, 2, batch["input_ids"].shape)
    model(**batch, token_type_ids=types)
    handle.remove()
    assert len(seen) == 2 and torch.equal(seen[1][0], types)  # ids, then the token types
    torch.testing.assert_close(seen[0][1].abs(), torch.full_like(seen[0][1],
                                                                 float(T.magnitudes(10))))
    assert torch.equal(seen[1][1], torch.zeros_like(seen[1][1]))  # the types: plain


def test_llava_with_inputs_embeds_and_pixels_trains():
    """The stock hook noises LLaVA's own lookup of its image token, which then matches no
    token ("Image features and image tokens do not match"): fastnoise noises only the
    lookup of the call's input_ids, and a call with inputs_embeds has none."""
    torch.manual_seed(0)
    model = T.llava().train()
    batch = T.llava_batch()
    fastnoise.patch(model, "neftune", alpha=5.0)
    emb = model.get_input_embeddings()
    with torch.no_grad():  # the caller's own embeddings (clean, or LLaVA finds no image)
        embeds = emb(batch["input_ids"])
    seen, handle = T.record_noise(emb)
    out = model(inputs_embeds=embeds.requires_grad_(), pixel_values=batch["pixel_values"],
                attention_mask=batch["attention_mask"], labels=batch["labels"])
    handle.remove()
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert len(seen) == 1 and seen[0][0].numel() == 1  # the model's image-token lookup...
    assert torch.equal(seen[0][1], torch.zeros_like(seen[0][1]))  # ...is plain
    # with input_ids the model's own lookup is the noisy one, images and all
    seen, handle = T.record_noise(emb)
    model(**batch).loss.backward()
    handle.remove()
    assert len(seen) == 1 and seen[0][1].abs().min() > 0


def test_llava_symnoise_pair_doubles_the_images():
    torch.manual_seed(0)
    model = T.llava().train()
    batch = T.llava_batch()
    expect = model(**_double(batch))
    fastnoise.patch(model, "symnoise", alpha=0.0)
    got = model(**batch)
    torch.testing.assert_close(got.loss, expect.loss, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------
# Row 3: encoder-decoders take each stack's own lengths
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(T.SEQ2SEQ))
def test_seq2seq_mask_is_the_encoders_only(name):
    torch.manual_seed(0)
    model = T.no_dropout(T.SEQ2SEQ[name]()).train()
    fastnoise.patch(model, "neftune", noise="bernoulli", alpha=5.0, use_attention_mask=True)
    encoder_emb = model.get_encoder().embed_tokens
    decoder_emb = model.get_decoder().embed_tokens
    seen_enc, h1 = T.record_noise(encoder_emb)
    seen_dec, h2 = ((seen_enc, None) if decoder_emb is encoder_emb
                    else T.record_noise(decoder_emb))
    ids = torch.randint(3, T.VOCAB, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = torch.randint(3, T.VOCAB, (2, 8))  # the decoder's length equals the encoder's
    model(input_ids=ids, attention_mask=mask, labels=labels)
    enc_noise = seen_enc[0][1]
    dec_noise = seen_dec[-1][1]
    for h in (h1, h2):
        if h is not None:
            h.remove()
    assert torch.equal(enc_noise[1, 5:], torch.zeros_like(enc_noise[1, 5:]))
    torch.testing.assert_close(enc_noise[1, :5].abs(),
                               torch.full_like(enc_noise[1, :5], float(T.magnitudes(5))))
    # the decoder: no mask of its own, so its padded length, every token noisy
    torch.testing.assert_close(dec_noise.abs(),
                               torch.full_like(dec_noise, float(T.magnitudes(8))))
    # with a decoder mask, the decoder's own lengths
    dec_mask = torch.ones_like(labels)
    dec_mask[0, 6:] = 0
    seen, handle = T.record_noise(decoder_emb)
    model(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=dec_mask)
    handle.remove()
    dec_noise = seen[-1][1]
    assert torch.equal(dec_noise[0, 6:], torch.zeros_like(dec_noise[0, 6:]))
    torch.testing.assert_close(dec_noise[0, :6].abs(),
                               torch.full_like(dec_noise[0, :6], float(T.magnitudes(6))))
    torch.testing.assert_close(dec_noise[1].abs(),
                               torch.full_like(dec_noise[1], float(T.magnitudes(8))))


def test_seq2seq_symnoise_is_refused_before_anything_changes():
    model = T.bart()
    with pytest.raises(ValueError, match="encoder-decoder"):
        fastnoise.patch(model, "symnoise")
    assert not fastnoise.is_patched(model) and not model._forward_pre_hooks


# --------------------------------------------------------------------------------------
# Row 10: one row of positions for the whole batch
# --------------------------------------------------------------------------------------
def test_one_row_of_position_ids_packs_every_row():
    torch.manual_seed(0)
    model = T.no_dropout(T.qwen2()).train()
    fastnoise.patch(model, "neftune", noise="bernoulli", alpha=5.0)
    seen, handle = T.record_noise(model.get_input_embeddings())
    ids = torch.randint(1, T.VOCAB, (2, 10))
    pos = torch.tensor([0, 1, 2, 3, 0, 1, 0, 1, 2, 3])
    model(input_ids=ids, position_ids=pos[None], labels=ids)  # (1, L): the model broadcasts
    handle.remove()
    expect = T.magnitudes([4, 4, 4, 4, 2, 2, 4, 4, 4, 4])[None, :, None].expand(2, 10, T.D)
    torch.testing.assert_close(seen[0][1].abs(), expect, rtol=1e-5, atol=1e-6)


def test_position_ids_that_do_not_fit_the_ids_are_refused():
    model = T.llama().train()
    fastnoise.patch(model, "neftune")
    ids = torch.randint(1, T.VOCAB, (2, 10))
    with pytest.raises(ValueError, match="packing=False"):
        model(input_ids=ids, position_ids=torch.arange(10).expand(3, 2, 10))
    fastnoise.patch(model, "neftune", packing=False)  # the padded length: fine
    model(input_ids=ids, position_ids=torch.arange(10).expand(3, 2, 10)[0])


def test_a_mask_that_is_not_per_token_is_refused_with_use_attention_mask():
    model = T.llama().train()
    fastnoise.patch(model, "neftune", use_attention_mask=True)
    ids = torch.randint(1, T.VOCAB, (2, 6))
    with pytest.raises(ValueError, match="use_attention_mask=False"):
        model(input_ids=ids, attention_mask=torch.ones(2, 1, 6, 6, dtype=torch.bool))


# --------------------------------------------------------------------------------------
# Row 4: copies; row 6: pickling
# --------------------------------------------------------------------------------------
def _packed_noise(model):
    """±1 noise of a packed, masked call: each sequence's L, none on masked positions."""
    emb = model.get_input_embeddings()
    seen, handle = T.record_noise(emb)
    ids = torch.randint(1, T.VOCAB, (2, 8))
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7]])
    model(input_ids=ids, position_ids=pos, labels=ids)
    handle.remove()
    lengths = torch.tensor([[3] * 3 + [5] * 5, [8] * 8])
    torch.testing.assert_close(seen[0][1].abs(),
                               T.magnitudes(lengths)[..., None].expand(2, 8, T.D),
                               rtol=1e-5, atol=1e-6)


def test_deepcopy_of_a_patched_model_is_patched_on_its_own():
    torch.manual_seed(0)
    model = T.no_dropout(T.llama()).train()
    fastnoise.patch(model, "neftune", noise="bernoulli", alpha=5.0, use_attention_mask=True)
    twin = copy.deepcopy(model)
    fastnoise.unpatch(model)  # the copy's hooks are its own
    assert fastnoise.is_patched(twin) and not fastnoise.is_patched(model)
    _packed_noise(twin)
    seen, handle = T.record_noise(twin.get_input_embeddings())
    twin(**_padded_batch("llama"))  # row 1 is padded from position 7
    handle.remove()
    noise = seen[0][1]
    assert torch.equal(noise[1, 7:], torch.zeros_like(noise[1, 7:]))
    torch.testing.assert_close(noise[1, :7].abs(),
                               torch.full_like(noise[1, :7], float(T.magnitudes(7))))
    fastnoise.patch(twin, "symnoise", alpha=0.0)
    batch = _padded_batch("llama")
    expect = model(**_double(batch)).loss
    torch.testing.assert_close(copy.deepcopy(twin)(**batch).loss, expect, rtol=1e-6,
                               atol=1e-7)
    fastnoise.unpatch(twin)
    assert not fastnoise.is_patched(twin) and not twin._forward_pre_hooks


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_a_pickled_patched_model_loads_patched(how):
    torch.manual_seed(0)
    model = T.no_dropout(T.llama()).train()
    fastnoise.patch(model, "neftune", noise="bernoulli", alpha=5.0)
    if how == "pickle":
        loaded = pickle.loads(pickle.dumps(model))
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
    assert fastnoise.is_patched(loaded)
    assert type(loaded.get_input_embeddings()) is type(model.get_input_embeddings())
    _packed_noise(loaded)
    fastnoise.unpatch(loaded)
    assert type(loaded.get_input_embeddings()) is torch.nn.Embedding


# --------------------------------------------------------------------------------------
# Row 5 (and row 4's PEFT half): embeddings PEFT trains or wraps
# --------------------------------------------------------------------------------------
peft = pytest.importorskip("peft")


def _peft(model, **config):
    return peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                      task_type="CAUSAL_LM", **config))


@pytest.mark.parametrize("order", ["patch after peft", "patch before peft"])
def test_modules_to_save_embedding_gets_noise_and_trains(order):
    torch.manual_seed(0)
    base = T.no_dropout(T.llama())
    if order == "patch before peft":  # PEFT deep-copies the patched embedding
        fastnoise.patch(base, "neftune", noise="bernoulli", alpha=5.0)
    model = _peft(base, modules_to_save=["embed_tokens"]).train()
    if order == "patch after peft":
        fastnoise.patch(model, "neftune", noise="bernoulli", alpha=5.0)
    wrapper = base.get_input_embeddings()
    trained = wrapper.modules_to_save["default"]
    assert isinstance(trained, fastnoise.NoisyEmbedding)
    _packed_noise_through(model, trained)
    before = trained.weight.detach().clone()
    loss = model(**_padded_batch("llama")).loss
    loss.backward()
    assert trained.weight.grad is not None and wrapper.original_module.weight.grad is None
    fastnoise.unpatch(model)
    assert not fastnoise.is_patched(model)
    assert type(trained) is torch.nn.Embedding and torch.equal(trained.weight, before)


def _packed_noise_through(model, lookup):
    seen, handle = T.record_noise(lookup)
    ids = torch.randint(1, T.VOCAB, (2, 8))
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7]])
    mask = torch.ones_like(ids)
    model(input_ids=ids, position_ids=pos, attention_mask=mask, labels=ids)
    handle.remove()
    lengths = torch.tensor([[3] * 3 + [5] * 5, [8] * 8])
    torch.testing.assert_close(seen[0][1].abs(),
                               T.magnitudes(lengths)[..., None].expand(2, 8, T.D),
                               rtol=1e-5, atol=1e-6)


def test_trainable_token_indices_get_noise_and_train():
    torch.manual_seed(0)
    model = _peft(T.no_dropout(T.llama()), trainable_token_indices=[3, 5]).train()
    fastnoise.patch(model, "neftune", noise="bernoulli", alpha=5.0)
    wrapper = model.get_input_embeddings()
    assert type(wrapper).__name__ == "TrainableTokensWrapper" and fastnoise.is_patched(model)
    seen = []
    handle = wrapper.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    ids = torch.randint(1, T.VOCAB, (2, 8))
    ids[:, 0] = 3
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7]])
    loss = model(input_ids=ids, position_ids=pos, labels=ids).loss
    handle.remove()
    with torch.no_grad():
        clean = wrapper(ids)  # no autograd: the plain (merged-weight) lookup
    lengths = torch.tensor([[3] * 3 + [5] * 5, [8] * 8])
    torch.testing.assert_close((seen[0] - clean).abs(),
                               T.magnitudes(lengths)[..., None].expand(2, 8, T.D),
                               rtol=1e-4, atol=1e-6)
    loss.backward()
    delta = wrapper.token_adapter.trainable_tokens_delta["default"]
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    fastnoise.patch(model, "symnoise", alpha=0.0)  # the pair through the wrapper
    batch = _padded_batch("llama")
    got = model(**batch).loss
    fastnoise.unpatch(model)
    torch.testing.assert_close(got, model(**_double(batch)).loss, rtol=1e-6, atol=1e-7)
    assert type(wrapper).__name__ == "TrainableTokensWrapper" and not fastnoise.is_patched(model)


def test_trainable_tokens_added_after_patch_is_reported_not_silent():
    torch.manual_seed(0)
    base = T.llama()
    fastnoise.patch(base, "neftune")
    model = _peft(base, trainable_token_indices=[3]).train()  # reads its own merged weight
    with pytest.raises(RuntimeError, match="call fastnoise.patch after wrapping"):
        model(**_padded_batch("llama"))
    fastnoise.patch(model, "neftune")  # patching the PEFT model fixes it
    model(**_padded_batch("llama")).loss.backward()


def test_prompt_tuning_lookup_gets_the_masked_lengths():
    torch.manual_seed(0)
    base = T.no_dropout(T.llama())
    model = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                              num_virtual_tokens=3)).train()
    fastnoise.patch(model, "neftune", noise="bernoulli", alpha=5.0, use_attention_mask=True)
    seen, handle = T.record_noise(base.get_input_embeddings())
    batch = _padded_batch("llama")
    model(**batch).loss.backward()
    handle.remove()
    noise = seen[0][1]
    assert torch.equal(noise[1, 7:], torch.zeros_like(noise[1, 7:]))
    torch.testing.assert_close(noise[1, :7].abs(),
                               torch.full_like(noise[1, :7], float(T.magnitudes(7))))


def test_stock_hook_on_the_embedding_is_refused():
    from transformers.integrations.neftune import activate_neftune

    model = T.llama()
    handle = activate_neftune(model, 5.0)
    with pytest.raises(ValueError, match="NEFTune hook"):
        fastnoise.patch(model, "neftune")
    assert not fastnoise.is_patched(model)
    handle.remove()
    fastnoise.patch(model, "neftune")
