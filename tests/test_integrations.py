"""patch / unpatch on tiny transformers models built from configs (no downloads)."""

import pytest
import torch

import fastnoise

transformers = pytest.importorskip("transformers")

VOCAB = 64


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2,
                                  n_positions=64)
    return transformers.GPT2LMHeadModel(cfg)


def _bert():
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=64)
    return transformers.BertForMaskedLM(cfg)


def _t5():
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=1,
                                num_heads=2, decoder_start_token_id=0,
                                dropout_rate=0.0)  # T5 also drops out functionally
    return transformers.T5ForConditionalGeneration(cfg)


def _gemma():
    cfg = transformers.GemmaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=16,
                                   max_position_embeddings=64)
    return transformers.GemmaForCausalLM(cfg)


def _mistral():
    cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, max_position_embeddings=64)
    return transformers.MistralForCausalLM(cfg)


def _qwen2():
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=64)
    return transformers.Qwen2ForCausalLM(cfg)


MODELS = {"llama": _llama, "gpt2": _gpt2, "bert": _bert, "t5": _t5, "gemma": _gemma,
          "mistral": _mistral, "qwen2": _qwen2}


def _batch(name, batch=2, length=10):
    ids = torch.randint(1, VOCAB, (batch, length))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if name == "t5":
        inputs["labels"] = torch.randint(1, VOCAB, (batch, 6))
    elif name == "bert":
        inputs["labels"] = ids.clone()
    else:
        inputs["labels"] = ids.masked_fill(mask == 0, -100)
    return inputs


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _train_logits(model, batch):
    """A training-mode forward with autograd on (noise needs both)."""
    return model(**batch).logits.detach()


@pytest.mark.parametrize("name", list(MODELS))
def test_patch_eval_exact_train_noisy_unpatch_restores(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    batch = _batch(name)
    original = model.get_input_embeddings()
    cls = type(original)
    model.eval()
    clean = _logits(model, batch)

    assert fastnoise.patch(model, "neftune", alpha=5.0) is model
    noisy_emb = model.get_input_embeddings()
    assert isinstance(noisy_emb, fastnoise.NoisyEmbedding) and fastnoise.is_patched(model)
    assert noisy_emb is original and noisy_emb.weight is original.weight  # the same object
    assert isinstance(noisy_emb, cls) and type(noisy_emb) is not cls
    assert torch.equal(_logits(model, batch), clean)  # eval: exactly the unpatched model

    # training-mode outputs differ from clean ones (dropout off so only the noise acts)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    noisy = _train_logits(model, batch)
    assert noisy.shape == clean.shape
    no_grad_train = _logits(model, batch)  # training mode under no_grad: no noise
    fastnoise.unpatch(model)
    assert model.get_input_embeddings() is original and not fastnoise.is_patched(model)
    assert type(original) is cls and not isinstance(original, fastnoise.NoisyEmbedding)
    model.train()
    clean_train = _train_logits(model, batch)
    assert not torch.allclose(noisy, clean_train)
    assert torch.equal(no_grad_train, _logits(model, batch))
    model.eval()
    assert torch.equal(_logits(model, batch), clean)


def test_gpt2_tied_lm_head_stays_tied_and_trains():
    torch.manual_seed(0)
    model = _gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    fastnoise.patch(model, "symnoise", alpha=5.0)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    model.train()
    batch = _batch("gpt2")
    out = model(**batch)
    assert out.logits.shape[0] == 4  # the SymNoise pair doubles the batch
    out.loss.backward()
    assert model.transformer.wte.weight.grad is not None
    assert torch.isfinite(out.loss)


def test_symnoise_loss_is_the_mean_of_the_pair():
    torch.manual_seed(0)
    model = _llama()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    batch = _batch("llama")
    batch["labels"] = batch["input_ids"].clone()  # same token count in each half
    fastnoise.patch(model, "symnoise", alpha=5.0)
    model.train()
    torch.manual_seed(3)
    loss = model(**batch).loss
    torch.manual_seed(3)
    pair = fastnoise.noisy_embedding(batch["input_ids"], model.get_input_embeddings().weight,
                                     noise="bernoulli", symmetric=True, alpha=5.0)
    fastnoise.unpatch(model)
    halves = [model(inputs_embeds=pair[i * 2:(i + 1) * 2],
                    attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
              for i in range(2)]
    torch.testing.assert_close(loss, (halves[0] + halves[1]) / 2, rtol=1e-5, atol=1e-6)


def test_patch_twice_is_safe_and_attention_mask_option():
    torch.manual_seed(0)
    model = _llama()
    original = model.get_input_embeddings()
    fastnoise.patch(model, "neftune")
    fastnoise.patch(model, "gaussian", alpha=10.0, use_attention_mask=True)
    emb = model.get_input_embeddings()
    assert emb.noise == "gaussian" and emb.alpha == 10.0
    seen = _noise_spy(emb)
    model.train()
    batch = _batch("llama")
    model(**batch)
    assert torch.equal(seen["noise"][1, 7:], torch.zeros_like(seen["noise"][1, 7:]))
    assert seen["noise"][0].abs().min() > 0
    del emb.forward
    fastnoise.unpatch(model)
    assert model.get_input_embeddings() is original
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_symmetric_on_encoder_decoder_is_refused():
    with pytest.raises(ValueError, match="encoder-decoder"):
        fastnoise.patch(_t5(), "symnoise")


def test_patch_needs_input_embeddings():
    with pytest.raises(TypeError, match="get_input_embeddings"):
        fastnoise.patch(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="method"):
        fastnoise.patch(_llama(), "mixout")


def test_peft_lora_model():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = _llama()
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                     task_type="CAUSAL_LM"))
    batch = _batch("llama")
    lora.eval()
    clean = _logits(lora, batch)
    fastnoise.patch(lora, "neftune")
    assert isinstance(base.get_input_embeddings(), fastnoise.NoisyEmbedding)
    assert torch.equal(_logits(lora, batch), clean)
    lora.train()
    loss = lora(**batch).loss
    loss.backward()
    assert any(p.grad is not None for n, p in lora.named_parameters() if "lora_" in n)
    fastnoise.unpatch(lora)
    assert not isinstance(base.get_input_embeddings(), fastnoise.NoisyEmbedding)


def test_noisytune_on_a_transformers_model():
    torch.manual_seed(0)
    model = _gpt2()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fastnoise.noisytune_(model, 0.15, seed=1)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "transformer.wte.weight" in changed and "transformer.h.0.attn.c_attn.weight" in changed
    assert "transformer.ln_f.weight" not in changed  # all ones: std 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _noise_spy(emb):
    seen = {}
    forward = emb.forward

    def spy(ids, *args, **kwargs):
        out = forward(ids, *args, **kwargs)
        seen["noise"] = (out - torch.nn.functional.embedding(ids, emb.weight)).detach()
        return out

    emb.forward = spy
    return seen


def test_packed_rows_get_each_sequence_length():
    torch.manual_seed(0)
    model = _llama()
    fastnoise.patch(model, "neftune", noise="bernoulli", alpha=5.0)
    model.train()
    emb = model.get_input_embeddings()
    seen = _noise_spy(emb)
    ids = torch.randint(1, VOCAB, (1, 10))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2, 3]])  # three packed examples: 4, 2, 4
    model(input_ids=ids, position_ids=pos)
    d = emb.weight.shape[1]
    got = seen["noise"].abs()[0]  # ±1 noise: |n| is mag, up to the rounding of (e + n) - e
    lengths = torch.tensor([4, 4, 4, 4, 2, 2, 4, 4, 4, 4], dtype=torch.float32)
    torch.testing.assert_close(got, (5.0 / (lengths * d).sqrt())[:, None].expand_as(got),
                               rtol=1e-5, atol=1e-6)
    model(input_ids=ids, position_ids=torch.arange(10)[None])  # unpacked: padded L
    torch.testing.assert_close(seen["noise"].abs(),
                               torch.full_like(seen["noise"], 5.0 / (10 * d) ** 0.5),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma_noise_lands_on_the_scaled_embedding(dtype):
    torch.manual_seed(0)
    model = _gemma().to(dtype)
    original = model.get_input_embeddings()
    assert abs(float(original.embed_scale) - 32 ** 0.5) < 0.02  # a buffer in the model's dtype
    ids = torch.randint(1, VOCAB, (2, 9))
    scaled = original(ids)  # the unpatched model's own embedding output
    fastnoise.patch(model, "neftune", noise="bernoulli", alpha=5.0)
    emb = model.get_input_embeddings()
    assert emb.embed_scale == float(original.embed_scale)
    emb.eval()
    assert torch.equal(emb(ids), scaled)
    emb.train()
    noise = (emb(ids).float() - scaled.float()).abs().detach()
    mag = 5.0 / (9 * 32) ** 0.5  # ±mag on the scaled rows, not sqrt(d) * mag
    tol = 1e-6 if dtype == torch.float32 else 0.02 * float(scaled.float().abs().max())
    assert float((noise - mag).abs().max()) <= tol
    out = emb(ids)
    out.float().sum().backward()  # d out / d weight = embed_scale per use
    counts = torch.bincount(ids.reshape(-1), minlength=VOCAB).to(torch.float32)
    expect = counts[:, None] * float(original.embed_scale)
    torch.testing.assert_close(emb.weight.grad.float(), expect.expand(-1, 32),
                               rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=0)


def test_gradient_checkpointing_model_trains():
    torch.manual_seed(0)
    model = _llama()
    model.gradient_checkpointing_enable()
    fastnoise.patch(model, "neftune")
    model.train()
    loss = model(**_batch("llama")).loss
    loss.backward()
    assert torch.isfinite(loss) and model.get_input_embeddings().weight.grad is not None


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def _embedding_noise(model):
    """Records (output - clean lookup) of the input embedding at each call (a forward hook)."""
    seen = []
    emb = model.get_input_embeddings()

    def hook(module, args, output):
        ids = args[0]
        clean = torch.nn.functional.embedding(ids, module.weight)
        if output.shape[0] == 2 * ids.shape[0]:
            clean = torch.cat([clean, clean])
        seen.append((output - clean).detach())

    return seen, emb.register_forward_hook(hook)


def test_positional_attention_mask_is_found():
    torch.manual_seed(0)
    model = _no_dropout(_llama())
    batch = _batch("llama")
    fastnoise.patch(model, "neftune", alpha=5.0, use_attention_mask=True)
    model.train()
    seen, handle = _embedding_noise(model)
    model(batch["input_ids"], batch["attention_mask"])  # the mask by position
    handle.remove()
    noise = seen[0]
    assert torch.equal(noise[1, 7:], torch.zeros_like(noise[1, 7:]))  # padding: no noise
    d = noise.shape[-1]
    torch.testing.assert_close(noise[1, :7].abs().max(), torch.tensor(5.0 / (7 * d) ** 0.5),
                               rtol=0.2, atol=0)  # row 1's own L = 7, not the padded 10


@pytest.mark.parametrize("peft_model", [False, True])
def test_symmetric_pair_doubles_positional_inputs(peft_model):
    """alpha = 0: the pair is the exactly doubled batch, so the patched model's loss is the
    unpatched model's loss on the explicitly doubled batch, inputs passed by position."""
    torch.manual_seed(0)
    model = _no_dropout(_llama())
    if peft_model:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                           task_type="CAUSAL_LM"))
    batch = _batch("llama")
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    labels[0, :3] = -100  # halves with different token counts per row
    model.train()
    double = lambda t: torch.cat([t, t])  # noqa: E731
    expect = model(input_ids=double(ids), attention_mask=double(mask), labels=double(labels))
    fastnoise.patch(model, "symnoise", alpha=0.0)
    if peft_model:  # PeftModelForCausalLM.forward(input_ids, attention_mask, inputs_embeds, labels)
        got = model(ids, mask, None, labels)
    else:  # LlamaForCausalLM.forward(input_ids, attention_mask, position_ids, ...)
        got = model(ids, mask, torch.arange(10).expand(2, 10), labels=labels)
    assert got.logits.shape[0] == 4
    torch.testing.assert_close(got.logits, expect.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.loss, expect.loss, rtol=1e-6, atol=1e-7)
    # Trainer's num_items_in_batch counts the un-doubled labels: the pair doubles it
    n = int((labels[:, 1:] != -100).sum())
    got = model(ids, mask, labels=labels, num_items_in_batch=torch.tensor(n))
    expect = fastnoise.unpatch(model)(input_ids=double(ids), attention_mask=double(mask),
                                      labels=double(labels), num_items_in_batch=torch.tensor(2 * n))
    torch.testing.assert_close(got.loss, expect.loss, rtol=1e-6, atol=1e-7)


def test_patch_reads_no_weight_shape_and_keeps_the_module_hooks():
    """A ZeRO-3-style placeholder weight (shape (0,)) at patch time; the real weight arrives
    through a pre-forward hook on the module object, as ZeRO-3 / FSDP2 gather it."""
    torch.manual_seed(0)
    model = _no_dropout(_llama())
    emb = model.get_input_embeddings()
    full = emb.weight
    emb.weight = torch.nn.Parameter(torch.empty(0))  # the placeholder
    gathered = []

    def gather(module, args):
        module.weight = full
        gathered.append(True)

    def release(module, args, output):
        module.weight = torch.nn.Parameter(torch.empty(0))

    emb.register_forward_pre_hook(gather)
    emb.register_forward_hook(release)
    fastnoise.patch(model, "neftune", alpha=5.0)
    assert model.get_input_embeddings() is emb and emb.weight.shape == (0,)
    model.train()
    out = model(**_batch("llama"))
    out.loss.backward()
    assert gathered and full.grad is not None and torch.isfinite(out.loss)
    fastnoise.unpatch(model)
    assert type(emb) is torch.nn.Embedding


def test_t5_encoder_and_decoder_embeddings_get_noise():
    torch.manual_seed(0)
    model = _t5()
    fastnoise.patch(model, "neftune", alpha=5.0)
    assert fastnoise.is_patched(model)
    assert isinstance(model.encoder.embed_tokens, fastnoise.NoisyEmbedding)
    model.train()
    batch = _batch("t5")
    noisy = model(**batch).logits.detach()
    fastnoise.unpatch(model)
    assert type(model.encoder.embed_tokens) is torch.nn.Embedding
    assert not torch.allclose(noisy, model(**batch).logits.detach())


def test_patching_a_noisy_embedding_is_refused():
    model = torch.nn.Module()
    model.emb = fastnoise.NoisyEmbedding(10, 4)
    model.get_input_embeddings = lambda: model.emb
    with pytest.raises(ValueError, match="already adds noise"):
        fastnoise.patch(model)


def test_symmetric_pair_doubles_varlen_boundaries_and_keeps_packed_lengths():
    torch.manual_seed(0)
    model = _no_dropout(_llama())
    fastnoise.patch(model, "symnoise", alpha=5.0)
    model.train()
    seen = {}
    model.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    noise, handle = _embedding_noise(model)
    ids = torch.randint(1, VOCAB, (1, 10))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    out = model(ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=6,
                max_length_k=6, labels=ids)
    handle.remove()
    assert out.logits.shape[0] == 2 and torch.isfinite(out.loss)
    assert seen["cu_seq_lens_q"].tolist() == [0, 4, 10, 14, 20] and seen["max_length_q"] == 6
    assert seen["position_ids"].shape == (2, 10)
    lengths = torch.tensor([4.0] * 4 + [6.0] * 6)  # each packed sequence's own L, both halves
    d = noise[0].shape[-1]
    expect = (5.0 / (lengths * d).sqrt())[:, None].expand(10, d)
    for half in noise[0]:
        torch.testing.assert_close(half.abs(), expect, rtol=1e-5, atol=1e-6)
