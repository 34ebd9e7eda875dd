"""Tiny tokenizers for the offline pipelines of :mod:`fastpref.testing.tiny_model`: a CLIP BPE
tokenizer over a small vocabulary and T5's (SD3's ``tokenizer_3``, FLUX's ``tokenizer_2``) as a
Unigram model built with the ``tokenizers`` library; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Words that get whole-word tokens (anything else still tokenizes, byte by byte).
VOCAB_WORDS = (
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "with",
    "and",
    "photo",
    "picture",
    "painting",
    "drawing",
    "background",
    "small",
    "large",
    "big",
    "tiny",
    "bright",
    "dark",
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "white",
    "black",
    "gray",
    "pink",
    "cyan",
    "circle",
    "square",
    "triangle",
    "diamond",
    "cross",
    "ring",
    "stripe",
    "dot",
)


# --------------------------------------------------------------------------------------------
# tokenizer files
# --------------------------------------------------------------------------------------------


def byte_symbols() -> List[str]:
    """The printable stand-in of every byte 0..255, in byte order (GPT-2/CLIP byte-level BPE).

    Bytes that are printable Latin-1 characters (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand
    for themselves; every other byte is shifted to the code points from 256 upwards, in order.
    """
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    symbols, shifted = [], 0
    for byte in range(256):
        if byte in keep:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def build_vocab(words: Sequence[str] = VOCAB_WORDS) -> Tuple[Dict[str, int], List[str]]:
    """A CLIP-style byte-level BPE vocabulary and merge list covering ``words`` as single tokens.

    The 256 byte symbols (and their word-final ``</w>`` forms), merges for ``words`` (the words
    of the toy data's captions), and CLIP's two special tokens last (``<|startoftext|>``,
    ``<|endoftext|>``), so any text tokenizes (unknown words fall back to bytes).
    Each word's merges join its symbols left to right (``r e`` -> ``re``, ``re d</w>`` ->
    ``red</w>``); every merge result is a vocabulary entry, so whatever order BPE applies them in,
    it only produces known tokens.
    """
    symbols = byte_symbols()
    vocab: Dict[str, int] = {}
    for token in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(token, len(vocab))
    table = {b: symbols[b] for b in range(256)}
    merges: List[str] = []
    for word in words:
        parts = [table[b] for b in word.lower().encode("utf-8")]
        if len(parts) < 2:
            continue
        parts[-1] += "</w>"
        current = parts[0]
        for nxt in parts[1:]:
            merge = f"{current} {nxt}"
            current = current + nxt
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(current, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def write_tokenizer(folder: Path) -> Tuple[Dict[str, int], List[str]]:
    """Write ``vocab.json`` and ``merges.txt`` into ``folder``; returns them."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab, merges


def load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(
        str(folder), model_max_length=MAX_LENGTH, bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
    )


# T5's tokenizer (SD3's tokenizer_3, FLUX's tokenizer_2): a SentencePiece-style Unigram model built
# with the tokenizers library (no sentencepiece, no download); its specials are T5's, ids 0-2.
T5_SPECIALS = ("<pad>", "</s>", "<unk>")
T5_MAX_LENGTH = 512  # the real T5 tokenizers' model_max_length


def build_t5_tokenizer(words: Sequence[str] = VOCAB_WORDS):
    """A ``T5TokenizerFast`` whose pieces are ``words`` (``"\u2581red"``...), the word boundary
    ``"\u2581"`` and the printable ASCII characters (any other character is ``<unk>``); it adds
    ``</s>`` after the text as T5 does and pads with ``<pad>`` (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [(token, 0.0) for token in T5_SPECIALS]
    pieces += [("\u2581" + word, -1.0) for word in words] + [("\u2581", -2.0)]
    pieces += [(chr(code), -5.0) for code in range(ord("!"), ord("~") + 1)]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=T5_SPECIALS.index("<unk>")))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", T5_SPECIALS.index("</s>"))]
    )
    return T5TokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=T5_MAX_LENGTH,
    )
