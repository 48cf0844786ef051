"""Tiny transformers models built from configs (no downloads), shared by the patch tests."""

import torch
import transformers

VOCAB = 64
D = 32  # hidden size of every text model here
_TEXT = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
_ENCODER = dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**_TEXT))


def qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_TEXT))


def mistral():
    return transformers.MistralForCausalLM(transformers.MistralConfig(**_TEXT))


def gemma():
    return transformers.GemmaForCausalLM(transformers.GemmaConfig(head_dim=16, **_TEXT))


def phi3():
    return transformers.Phi3ForCausalLM(transformers.Phi3Config(pad_token_id=0, **_TEXT))


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=1, n_head=2, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def bert():
    return transformers.BertForMaskedLM(transformers.BertConfig(**_ENCODER))


def bert_classifier():
    return transformers.BertForSequenceClassification(
        transformers.BertConfig(num_labels=3, **_ENCODER))


def roberta():
    # RoBERTa builds its position ids from input_ids (padding_idx 1) and its token types itself
    return transformers.RobertaForMaskedLM(transformers.RobertaConfig(pad_token_id=1, **_ENCODER))


def t5():
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=D, d_kv=16, d_ff=64, num_layers=1,
                                num_heads=2, decoder_start_token_id=0, dropout_rate=0.0)
    return transformers.T5ForConditionalGeneration(cfg)


def bart():
    cfg = transformers.BartConfig(vocab_size=VOCAB, d_model=D, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2,
                                  encoder_ffn_dim=64, decoder_ffn_dim=64,
                                  max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                                  pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                  decoder_start_token_id=2)
    return transformers.BartForConditionalGeneration(cfg)


IMAGE_TOKEN = VOCAB - 1
IMAGE_TOKENS = 4  # (8 / 4) ** 2 patches per image


def llava():
    vision = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2,
                                           image_size=8, patch_size=4, projection_dim=16)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=transformers.LlamaConfig(
        **_TEXT), image_token_id=IMAGE_TOKEN, vision_feature_layer=-1,
        vision_feature_select_strategy="default")
    return transformers.LlavaForConditionalGeneration(cfg)


def llava_batch(batch=2, length=10):
    ids = torch.randint(2, IMAGE_TOKEN, (batch, length))
    ids[:, 1:1 + IMAGE_TOKENS] = IMAGE_TOKEN
    return {"input_ids": ids, "pixel_values": torch.randn(batch, 3, 8, 8),
            "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


DECODERS = {"llama": llama, "qwen2": qwen2, "mistral": mistral, "gemma": gemma, "phi3": phi3,
            "gpt2": gpt2}
ENCODERS = {"bert": bert, "roberta": roberta}
SEQ2SEQ = {"t5": t5, "bart": bart}


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def record_noise(embedding):
    """Forward hook on a patched embedding: (ids, output - the original class's lookup of
    the same ids) of every call; a SymNoise pair's doubled ids give [n, -n]."""
    import fastnoise.modules as M

    seen = []

    def hook(module, args, output):
        ids = args[0]
        clean = M._base_class(type(module)).forward(module, ids)
        if ids.dim() and output.shape[0] == 2 * ids.shape[0]:  # a pair outside a model call
            clean = torch.cat([clean, clean])
        seen.append((ids.detach().clone(), (output - clean).detach()))

    return seen, embedding.register_forward_hook(hook)


def magnitudes(lengths, alpha=5.0, d=D):
    """Per-token |noise| of ±1 noise for these per-token sequence lengths."""
    lengths = torch.as_tensor(lengths, dtype=torch.float64)
    return (alpha / (lengths * d).sqrt()).to(torch.float32)
