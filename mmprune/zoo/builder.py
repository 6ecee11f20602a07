"""Build the pieces of a small HF LLaVA: word-level tokenizer, PIL image processor, processor, config.

Everything is the stock transformers class a real checkpoint uses (``LlavaForConditionalGeneration``,
``LlavaProcessor``, ``CLIPImageProcessorPil``, ``PreTrainedTokenizerFast``), so adapters and methods see the
same code path as with ``llava-hf/llava-1.5-7b-hf``.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

# "</s>" is not id 2: HF's CLIP text tower treats eos_token_id == 2 as a legacy config and pools at argmax(ids)
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}"
    "{% endif %}{% endfor %} {% else %}ASSISTANT: {{ message['content'][0]['text'] }} </s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (``tokenizers`` WordLevel over whitespace and punctuation), left padding."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + [w for w in words if w not in SPECIAL])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    # left padding (saved with the tokenizer): generate() reads the last position of every prompt
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"},
                                        padding_side="left")
    return tokenizer


def llava_processor(words: list[str], image_size: int, patch_size: int) -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=word_tokenizer(words), patch_size=patch_size,
                          vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                          image_token="<image>", num_additional_image_tokens=1)


def llava_config(tokenizer: PreTrainedTokenizerFast, vision: CLIPVisionConfig, hidden_size: int,
                 intermediate_size: int, num_layers: int, num_heads: int, num_kv_heads: int | None = None,
                 max_positions: int = 1024) -> LlavaConfig:
    """LLaVA-1.5's wiring (features from the penultimate CLIP layer, [CLS] dropped, 2-layer GELU projector)."""
    vocab = tokenizer.get_vocab()
    text = LlamaConfig(hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                       num_attention_heads=num_heads, num_key_value_heads=num_kv_heads or num_heads,
                       vocab_size=len(vocab), max_position_embeddings=max_positions, pad_token_id=vocab["<pad>"],
                       bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"])
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab["<image>"],
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu")
