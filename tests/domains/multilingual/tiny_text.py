"""A tiny random multilingual text encoder folder built in code (no download): a byte-level BPE
tokenizer trained on a few sentences in six scripts plus a 2-layer XLM-R (or BERT) config."""
from __future__ import annotations

from pathlib import Path

SENTENCES = [
    "A little girl climbing into a wooden playhouse.", "Ein kleines Mädchen klettert in ein Spielhaus aus Holz.",
    "Une petite fille grimpe dans une maisonnette en bois.", "Malá dívka leze do dřevěného hračkového domu.",
    "Una niña pequeña sube a una casita de madera.", "一个小女孩正在爬进一个木制的游戏屋。",
    "Two dogs on pavement moving toward each other.", "Zwei Hunde auf dem Gehweg.", "Deux chiens sur le trottoir.",
    "Dva psi na chodníku jdou proti sobě.", "Dos perros en la acera.", "两只狗在人行道上相向而行。",
]


def save_tiny_multilingual(folder: Path, family: str = "xlm-roberta", vocab_size: int = 400) -> Path:
    """Write ``folder`` with a byte-level BPE tokenizer (keeps any script) and a random tiny encoder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast, XLMRobertaConfig, XLMRobertaModel

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(SENTENCES, trainer)
    from tokenizers.processors import TemplateProcessing

    tokenizer.post_processor = TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", cls_token="<s>", sep_token="</s>", model_max_length=64)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    sizes = dict(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64)
    if family == "xlm-roberta":
        XLMRobertaModel(XLMRobertaConfig(**sizes, max_position_embeddings=72, pad_token_id=1)).save_pretrained(folder)
    elif family == "bert":
        BertModel(BertConfig(**sizes, max_position_embeddings=72, pad_token_id=1)).save_pretrained(folder)
    else:
        raise ValueError(f"family must be 'xlm-roberta' or 'bert', got {family!r}")
    return folder
