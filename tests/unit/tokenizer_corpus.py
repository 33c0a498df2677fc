"""A fixed corpus of 1,000 strings for comparing tokenizers with transformers: several scripts and languages,
code, numbers, emoji (modifiers, ZWJ sequences, flags), whitespace runs of every kind and special-token
look-alikes, cut and joined at random (seeded) so that pieces meet at odd boundaries."""

from __future__ import annotations

import random

SCRIPTS = [
    "The quick brown fox jumps over the lazy dog.", "It's what they'VE said: don't, WON'T, I'm, we'll.",
    "Le cœur a ses raisons que la raison ne connaît point.", "Größere Straßen führen über Brücken.",
    "¿Dónde está la biblioteca? ¡Allí!", "Português: ação, coração, pão, irmã.",
    "Съешь же ещё этих мягких французских булок.", "Γαζέες καὶ μυρτιὲς δὲν θὰ βρῶ πιὰ στὸ χρυσαφὶ ξέφωτο.",
    "نص عربي للاختبار مع أرقام ١٢٣", "עברית: שלום עולם, מה שלומך?", "हिन्दी में एक वाक्य, नमस्ते।",
    "ภาษาไทยไม่มีช่องว่างระหว่างคำ", "中文句子没有空格，标点符号也不同。", "日本語のテキスト、カタカナとひらがな。",
    "한국어 문장과 띄어쓰기.", "Tiếng Việt có dấu: Đường phố Hà Nội.", "Türkçe: ığüşöç İĞÜŞÖÇ.",
    "ქართული ენა", "Հայերեն լեզու", "አማርኛ ቋንቋ", "தமிழ் மொழி", "ᚠᛇᚻ᛫ᛒᛦᚦ", "Ελληνικά ΚΕΦΑΛΑΙΑ",
]
CODE = [
    "def f(x):\n    return x ** 2  # square\n", "for (let i = 0; i < n; i++) { sum += a[i]; }",
    '{"key": [1, 2.5, -3e10, null, true], "nested": {"a": "b"}}', "SELECT id, name FROM users WHERE age >= 21;",
    "<div class=\"x\">Hello &amp; <b>bye</b></div>", "#include <stdio.h>\nint main(void) { return 0; }",
    "fn main() -> Result<(), Box<dyn Error>> { Ok(()) }", "x86_64-linux-gnu /usr/lib/python3.11/site-packages",
    "https://example.com/path?q=a+b&lang=en#frag", "git commit -m 'fix: off-by-one' && make -j8",
    "λx.λy.x", "∀ε>0 ∃δ>0: |x−a|<δ ⇒ |f(x)−f(a)|<ε", "a_b__c___d", "camelCaseIdentifier snake_case CONSTANT_X",
]
NUMBERS = ["0", "7", "42", "123", "1234", "12345678901234567890", "3.14159", "-0.001", "1e-9", "0x1F", "2024-01-01",
           "12:34:56", "1,234,567.89", "٣٤٥", "４５６", "½ ¾ ⅓", "#1", "$12.50", "100%", "IPv6 ::1", "192.168.0.1:8080"]
EMOJI = ["😀", "👍🏽", "🇫🇷", "🇯🇵", "👨‍👩‍👧", "🏳️‍🌈", "❤️", "🐍", "🤖", "✨", "🧑🏿‍🚀", "©", "™", "🔥🔥🔥"]
WHITESPACE = [" ", "  ", "   ", "    ", "        ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", "\r", " \n ",
              "\u00a0", "\u3000", "\u200b", " \t \n", "\f", "\v"]
LOOKALIKES = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>", "</s>", "<unk>", "<pad>", "<bos>", "<eos>",
              "<start_of_turn>", "<end_of_turn>", "<mask>", "<unused7>", "[multimodal]", "<0x41>", "<0x0A>", "▁",
              "▁▁hello", "<|im_start", "im_end|>", "< bos >", "<BOS>", "<|system|>", "[INST]", "[/INST]",
              "<think>", "</think>", "<<SYS>>", "<|eot_id|>", "<tool_call>", "<<", ">>", "<|", "|>"]
POOLS = [SCRIPTS, CODE, NUMBERS, EMOJI, WHITESPACE, LOOKALIKES]


def corpus(n: int = 1000, seed: int = 20261202) -> list[str]:
    """`n` distinct strings: the pools' entries whole first, then random joins of 1-6 pieces (a piece
    sometimes cut at a random character), with or without separators."""
    rng = random.Random(seed)
    out = list(dict.fromkeys(s for pool in POOLS for s in pool))
    seen = set(out)
    while len(out) < n:
        pieces = []
        for _ in range(rng.randint(1, 6)):
            piece = rng.choice(rng.choice(POOLS))
            if len(piece) > 3 and rng.random() < 0.3:
                cut = rng.randrange(1, len(piece))
                piece = piece[:cut] if rng.random() < 0.5 else piece[cut:]
            pieces.append(piece)
        sep = rng.choice(["", " ", "", "\n", rng.choice(WHITESPACE)])
        text = sep.join(pieces)
        if rng.random() < 0.1:
            text = text.upper()
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out[:n]
