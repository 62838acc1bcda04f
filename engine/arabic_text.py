"""Arabic text normalization for scoring, and a tokenizer that keeps Arabic words for ROUGE.

Scores of Arabic output move with spelling conventions that carry no meaning for the task:
optional diacritics, the choice of alef seat, alef maqsura written as ya, Arabic-Indic or
ASCII digits, punctuation. ``normalize_arabic`` maps these to one form so that WER, CER and
ROUGE measure words, not orthography. The steps, in order:

1. Unicode NFKC: presentation forms (e.g. the lam-alef ligature U+FEFB) and full-width Latin
   fold to their base letters.
2. Invisible format characters (category Cf: ZWNJ, ZWJ, LRM/RLM, the Arabic letter mark,
   the end-of-ayah sign) are deleted.
3. Diacritics are deleted: harakat (fatha, damma, kasra), tanwin, shadda, sukun, maddah and
   hamza marks written as combining characters, superscript (dagger) alef, the Quranic
   honorifics and annotation marks (U+0610-U+061A, U+06D6-U+06ED, U+08D3-U+08FF) and the two
   Quranic symbols U+06DE / U+06E9. Tatweel (U+0640, a stretching stroke) is deleted.
4. Letters are unified:
   - alef forms آ أ إ ٱ (and the rarer wavy-hamza / high-hamza alefs) -> ا
   - hamza carriers ؤ -> و and ئ -> ي
   - standalone hamza ء is KEPT: it is a letter on the line with no carrier to vary,
     and deleting it would merge different words (سماء "sky" and سما "rose").
   - alef maqsura ى and Farsi yeh ی -> ي ; keheh ک -> ك (text typed on Persian keyboards)
   - taa marbuta ة: kept by default; ``taa_marbuta="to_ha"`` maps it to ه (the common
     spelling variation at word ends, as in مدرسة / مدرسه).
5. Arabic-Indic (٠-٩) and Extended Arabic-Indic (۰-۹) digits -> ASCII 0-9.
6. Punctuation is replaced by a space: every Unicode punctuation character (categories
   P*, which include ، ؛ ؟ ٪ ٫ « ») and every ASCII punctuation character
   (``string.punctuation``, which also holds the ASCII symbols $ + < = > ^ ` | ~). A space,
   not deletion, so that "كلمة،كلمة" stays two words.
7. Latin letters are lowercased; whitespace runs collapse to one space; ends are stripped.

The function is idempotent: normalizing a normalized string returns it unchanged.
"""
from __future__ import annotations

import string
import unicodedata

TAA_MARBUTA_OPTIONS = ("keep", "to_ha")

TATWEEL = "\u0640"
TAA_MARBUTA = "\u0629"
HA = "\u0647"

# Combining marks and Quranic annotation signs deleted in step 3 (inclusive code point ranges,
# from the Unicode Arabic and Arabic Extended-A blocks).
_DIACRITIC_RANGES = (
    (0x0610, 0x061A),  # honorifics (sallallahou ...) and small fatha/damma/kasra
    (0x064B, 0x065F),  # tanwin, harakat, shadda, sukun, maddah/hamza above/below, ...
    (0x0670, 0x0670),  # superscript (dagger) alef
    (0x06D6, 0x06DC),  # Quranic small high ligatures and letters
    (0x06DE, 0x06DE),  # start of rub el hizb
    (0x06DF, 0x06E8),  # Quranic small high/low marks, small waw / small yeh
    (0x06E9, 0x06E9),  # place of sajdah
    (0x06EA, 0x06ED),  # Quranic stops, small low meem
    (0x08D3, 0x08E1),  # Arabic Extended-A Quranic marks
    (0x08E3, 0x08FF),  # Arabic Extended-A tanwin forms and marks
)

_LETTER_MAP = {
    # alef forms -> bare alef
    "\u0622": "\u0627",  # آ alef with madda above
    "\u0623": "\u0627",  # أ alef with hamza above
    "\u0625": "\u0627",  # إ alef with hamza below
    "\u0671": "\u0627",  # ٱ alef wasla
    "\u0672": "\u0627",  # ٲ alef with wavy hamza above
    "\u0673": "\u0627",  # ٳ alef with wavy hamza below
    "\u0675": "\u0627",  # ٵ high hamza alef
    # hamza carriers -> the carrier letter
    "\u0624": "\u0648",  # ؤ -> و
    "\u0626": "\u064A",  # ئ -> ي
    "\u0676": "\u0648",  # ٶ high hamza waw -> و
    "\u0678": "\u064A",  # ٸ high hamza yeh -> ي
    # ya variants
    "\u0649": "\u064A",  # ى alef maqsura -> ي
    "\u06CC": "\u064A",  # ی Farsi yeh -> ي
    # kaf variant
    "\u06A9": "\u0643",  # ک keheh -> ك
}

_DIGIT_MAP = {0x0660 + value: str(value) for value in range(10)}
_DIGIT_MAP.update({0x06F0 + value: str(value) for value in range(10)})


def _build_translation_table() -> dict[int, str | None]:
    table: dict[int, str | None] = {}
    for first, last in _DIACRITIC_RANGES:
        for code_point in range(first, last + 1):
            table[code_point] = None
    table[ord(TATWEEL)] = None
    table.update({ord(source): target for source, target in _LETTER_MAP.items()})
    table.update(_DIGIT_MAP)
    table.update({ord(mark): " " for mark in string.punctuation})
    return table


_TRANSLATION = _build_translation_table()
_TAA_TO_HA = {ord(TAA_MARBUTA): HA}


def _is_format_character(character: str) -> bool:
    return unicodedata.category(character) == "Cf"


def _is_punctuation(character: str) -> bool:
    return unicodedata.category(character).startswith("P")


def normalize_arabic(text: str, taa_marbuta: str = "keep") -> str:
    """Return ``text`` in the normalized form described in the module docstring.

    ``taa_marbuta`` is "keep" (ة stays) or "to_ha" (ة becomes ه).
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize_arabic expects a str, got {type(text).__name__}")
    if taa_marbuta not in TAA_MARBUTA_OPTIONS:
        raise ValueError(
            f"taa_marbuta={taa_marbuta!r} is not an option; use one of {TAA_MARBUTA_OPTIONS}"
        )
    text = unicodedata.normalize("NFKC", text)
    text = "".join(character for character in text if not _is_format_character(character))
    text = text.translate(_TRANSLATION)
    if taa_marbuta == "to_ha":
        text = text.translate(_TAA_TO_HA)
    text = "".join(" " if _is_punctuation(character) else character for character in text)
    return " ".join(text.lower().split())


class ArabicRougeTokenizer:
    """Tokenizer for ``rouge_scorer.RougeScorer(tokenizer=...)`` that keeps Arabic words.

    rouge-score's default tokenizer keeps only [a-z0-9] and so scores any Arabic text as 0.
    This one normalizes with ``normalize_arabic`` and splits on whitespace. No stemming:
    Porter stemming is English-only.
    """

    def __init__(self, taa_marbuta: str = "keep"):
        if taa_marbuta not in TAA_MARBUTA_OPTIONS:
            raise ValueError(
                f"taa_marbuta={taa_marbuta!r} is not an option; use one of {TAA_MARBUTA_OPTIONS}"
            )
        self.taa_marbuta = taa_marbuta

    def tokenize(self, text: str) -> list[str]:
        return normalize_arabic(text, taa_marbuta=self.taa_marbuta).split()
