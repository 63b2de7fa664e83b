"""Write a random-weight llama GGUF sized so that prompt processing costs real time.

The fleet benchmark (bench/fleet/engines.py) needs an engine whose prefill of a
conversation's history takes long enough that a prompt-cache hit is visible: a
~1,900-token history in the better part of a second cold, a tenth of that when
the engine still holds all but the last message. tests/e2e/llama_model.py writes
a 64-wide model that prefills in milliseconds; this one follows its recipe
(seeded random weights, ChatML template, a constant embedding channel that keeps
control and byte tokens from ever being sampled, so every answer runs to
``max_tokens``) at 512 wide, 4 layers, an FFN of 3,328, f16: 61 MB. On two cores
of a Xeon (AVX-512) llama-server prefills it at ~2,800 tokens/s with both cores,
~1,500 with one; the FFN width is what sets that speed.

Tokenizer: SentencePiece-style ("llama") with the 256 byte-fallback tokens,
printable ASCII, and a few thousand pronounceable pseudo-words, each with every
prefix of it as a piece too (the SPM merge builds a word up one character at a
time, so a word is one token only if its prefixes are pieces). The trace
(bench/fleet/trace.py) writes its messages from the same words, so one word is
one token and a message's length in tokens is known before it is sent.

    python bench/fleet/model.py OUT.gguf     # prints OUT.gguf and its size
"""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np
import numpy.typing as npt

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MODEL_NAME = "fleet-random-llama"
SEED = 20250611

N_EMBD = 512
N_HEAD = 8
N_HEAD_KV = 4
N_LAYER = 4
N_FF = 3328
CONTEXT_LENGTH = 8192
N_WORDS = 1200

_ONSETS = [
    *"bcdfghjklmnprstvwz",
    *("bl", "br", "ch", "cl", "cr", "dr", "fl", "fr", "gl", "gr", "kl"),
    *("pl", "pr", "sh", "sk", "sl", "sn", "sp", "st", "th", "tr"),
]
_VOWELS = [*"aeiou", *"aeiou", "ai", "au", "ea", "ee", "ie", "oa", "oo", "ou"]
_CODAS = ["", "", "", "n", "r", "s", "l", "t", "m", "k", "nd", "st"]


def words(n: int = N_WORDS, seed: int = SEED) -> list[str]:
    """``n`` distinct pseudo-words of one to three syllables, the same for a seed."""
    rng = random.Random(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        syllables = rng.choice((1, 2, 2, 2, 3, 3))
        word = "".join(
            rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)
        )
        if 3 <= len(word) <= 12:
            out[word] = None
    return list(out)


def vocab(word_list: Sequence[str]) -> tuple[list[str], list[float], list[int], int]:
    """(tokens, scores, token_types, n_bad), with the n_bad unsampleable tokens first."""
    tt = gguf.TokenType
    tokens: list[str] = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types: list[int] = [tt.UNKNOWN, tt.CONTROL, tt.CONTROL, tt.CONTROL, tt.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [tt.BYTE] * 256
    n_bad = len(tokens)

    pieces: dict[str, None] = {"▁": None}
    for c in range(0x21, 0x7F):  # printable ASCII except space
        pieces[chr(c)] = None
    for word in word_list:
        full = "▁" + word
        for end in range(2, len(full) + 1):
            pieces[full[:end]] = None
    for piece in ("system", "user", "assistant"):  # the template's role names
        for end in range(2, len(piece) + 1):
            pieces[piece[:end]] = None
    scores: list[float] = [0.0] * len(tokens)
    for piece in pieces:
        tokens.append(piece)
        types.append(tt.NORMAL)
        # SPM merges the highest-scoring pair first: prefer longer pieces.
        scores.append(-100.0 + float(len(piece)))
    assert len(set(tokens)) == len(tokens)
    return tokens, scores, [int(t) for t in types], n_bad


def write_model(path: Path) -> int:
    """Write the deterministic model to ``path``; returns the number of vocabulary tokens."""
    tokens, scores, types, n_bad = vocab(words())
    n_vocab = len(tokens)
    head_dim = N_EMBD // N_HEAD
    kv_dim = head_dim * N_HEAD_KV
    rng = np.random.default_rng(SEED)
    # weights ~ N(0, gain / fan_in): activations stay of order one through the layers
    std_in = 1.0 / np.sqrt(N_EMBD)

    def rand(*shape: int, std: float, dtype: type = np.float32) -> npt.NDArray[np.generic]:
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(dtype)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(MODEL_NAME)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(tokens.index("<|im_end|>"))  # ChatML ends a turn with it
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)
    writer.add_chat_template(CHATML_TEMPLATE)

    # Token embeddings: dim 0 is a constant "bias" channel that no layer writes to.
    embd = rand(n_vocab, N_EMBD, std=1.0)
    embd[:, 0] = 8.0
    writer.add_tensor("token_embd.weight", embd.astype(np.float16))

    for i in range(N_LAYER):
        p = f"blk.{i}."
        attn_out = rand(N_EMBD, N_EMBD, std=0.5 * std_in)
        ffn_down = rand(N_EMBD, N_FF, std=0.5 / np.sqrt(N_FF))
        attn_out[0, :] = 0.0  # keep the bias channel constant through the
        ffn_down[0, :] = 0.0  # residual stream
        writer.add_tensor(p + "attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(p + "attn_q.weight", rand(N_EMBD, N_EMBD, std=std_in, dtype=np.float16))
        writer.add_tensor(p + "attn_k.weight", rand(kv_dim, N_EMBD, std=std_in, dtype=np.float16))
        writer.add_tensor(p + "attn_v.weight", rand(kv_dim, N_EMBD, std=std_in, dtype=np.float16))
        writer.add_tensor(p + "attn_output.weight", attn_out.astype(np.float16))
        writer.add_tensor(p + "ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(p + "ffn_gate.weight", rand(N_FF, N_EMBD, std=std_in, dtype=np.float16))
        writer.add_tensor(p + "ffn_up.weight", rand(N_FF, N_EMBD, std=std_in, dtype=np.float16))
        writer.add_tensor(p + "ffn_down.weight", ffn_down.astype(np.float16))

    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    out = rand(n_vocab, N_EMBD, std=std_in)
    out[:, 0] = 1.0
    out[:n_bad, 0] = -6.0  # control/byte/unknown tokens: never sampled
    writer.add_tensor("output.weight", out.astype(np.float16))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return n_vocab


def main(argv: list[str]) -> int:
    target = Path(argv[1] if len(argv) > 1 else "fleet-llama.gguf")
    target.parent.mkdir(parents=True, exist_ok=True)
    n_vocab = write_model(target)
    size_mb = target.stat().st_size / 1e6
    print(f"{target} ({size_mb:.0f} MB, vocabulary {n_vocab} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
