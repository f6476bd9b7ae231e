"""Language codes: NLLB/FLORES-200 codes (``eng_Latn``) and the short codes users type."""

from __future__ import annotations

# ISO 639-1 / common short codes -> NLLB codes, for the languages users are most likely to type.
SHORT_TO_NLLB: dict[str, str] = {
    "en": "eng_Latn", "de": "deu_Latn", "fr": "fra_Latn", "cs": "ces_Latn", "es": "spa_Latn",
    "it": "ita_Latn", "pt": "por_Latn", "nl": "nld_Latn", "pl": "pol_Latn", "ru": "rus_Cyrl",
    "uk": "ukr_Cyrl", "tr": "tur_Latn", "ar": "arb_Arab", "zh": "zho_Hans", "ja": "jpn_Jpan",
    "ko": "kor_Hang", "hi": "hin_Deva", "sv": "swe_Latn", "fi": "fin_Latn", "da": "dan_Latn",
    "ro": "ron_Latn", "hu": "hun_Latn", "el": "ell_Grek", "bg": "bul_Cyrl", "sk": "slk_Latn",
    "et": "est_Latn", "lt": "lit_Latn", "lv": "lvs_Latn", "sl": "slv_Latn", "hr": "hrv_Latn",
    "vi": "vie_Latn", "id": "ind_Latn", "th": "tha_Thai", "he": "heb_Hebr", "fa": "pes_Arab",
    "sw": "swh_Latn",
}
# Three-letter codes (NTREX file names, ISO 639-3) for the same languages.
ISO3_TO_NLLB: dict[str, str] = {v.split("_")[0]: v for v in SHORT_TO_NLLB.values()}
ISO3_TO_NLLB.update({"zho": "zho_Hans", "ara": "arb_Arab"})

# English names, for prompts of decoder-only models and for reports.
NAMES: dict[str, str] = {
    "eng_Latn": "English", "deu_Latn": "German", "fra_Latn": "French", "ces_Latn": "Czech",
    "spa_Latn": "Spanish", "ita_Latn": "Italian", "por_Latn": "Portuguese", "nld_Latn": "Dutch",
    "pol_Latn": "Polish", "rus_Cyrl": "Russian", "ukr_Cyrl": "Ukrainian", "tur_Latn": "Turkish",
    "arb_Arab": "Arabic", "zho_Hans": "Chinese", "jpn_Jpan": "Japanese", "kor_Hang": "Korean",
    "hin_Deva": "Hindi", "swe_Latn": "Swedish", "fin_Latn": "Finnish", "dan_Latn": "Danish",
    "ron_Latn": "Romanian", "hun_Latn": "Hungarian", "ell_Grek": "Greek", "bul_Cyrl": "Bulgarian",
    "slk_Latn": "Slovak", "est_Latn": "Estonian", "lit_Latn": "Lithuanian", "lvs_Latn": "Latvian",
    "slv_Latn": "Slovenian", "hrv_Latn": "Croatian", "vie_Latn": "Vietnamese",
    "ind_Latn": "Indonesian", "tha_Thai": "Thai", "heb_Hebr": "Hebrew", "pes_Arab": "Persian",
    "swh_Latn": "Swahili",
}

_SCRIPTS = {"Latn", "Cyrl", "Arab", "Hans", "Hant", "Jpan", "Hang", "Deva", "Grek", "Thai",
            "Hebr", "Beng", "Ethi", "Geor", "Armn", "Taml", "Telu", "Knda", "Mlym", "Gujr",
            "Guru", "Orya", "Sinh", "Khmr", "Laoo", "Mymr", "Tibt", "Tfng"}


def to_nllb(code: str) -> str:
    """Normalise ``en``, ``eng`` or ``eng_Latn`` to the NLLB code; raise ValueError naming the code."""
    c = code.strip()
    if c in SHORT_TO_NLLB:
        return SHORT_TO_NLLB[c]
    if c in ISO3_TO_NLLB:
        return ISO3_TO_NLLB[c]
    parts = c.split("_")
    if len(parts) == 2 and len(parts[0]) == 3 and parts[0].islower() and parts[1] in _SCRIPTS:
        return c
    raise ValueError(
        f"unknown language code {code!r}: expected an NLLB code like 'eng_Latn' "
        f"or a short code like {', '.join(sorted(SHORT_TO_NLLB)[:6])}, ..."
    )


def name(code: str) -> str:
    """English name of an NLLB code (the code itself when unknown)."""
    return NAMES.get(code, code)
