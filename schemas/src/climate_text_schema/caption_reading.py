"""Reading captions back (CONTRACT section 7): the numbers of a caption in any of its phrasings, and the number
sentences rewritten in one phrasing (the training target). The sentences themselves are written by `captions`,
whose docstring tables every quantity; the patterns here are derived from those same templates, so the format
exists once.
"""


import re
import string
from collections.abc import Iterable

from .captions import CAPTION_FORMS, COMPASS, EXTREMES, FACETS, FIELD_KEYS, NUMBER_FACETS, TEMPLATES
from .errors import ContractError

__all__ = ["canonical_caption", "caption_target", "parse_caption_numbers"]

_NUMBER = r"-?\d+(?:\.\d+)?"


def _pattern(fmt: str) -> re.Pattern[str]:
    out = []
    for literal, name, _, _ in string.Formatter().parse(fmt.rstrip(".;:")):
        out.append(re.escape(literal))
        if name in FIELD_KEYS:
            out.append(f"(?P<{name}>{_NUMBER})")
        elif name == "sign":
            out.append("(?P<sign>warmer|colder)")
        elif name == "dirp":
            out.append(r"(?:from the (?P<dir>[a-z\-]+)|with no prevailing direction)")
        elif name is not None:
            out.append(r".+?")
    return re.compile("".join(out) + r"[.;]?")


_PATTERNS: dict[str, list[re.Pattern[str]]] = {
    facet: [_pattern(t[facet]) for t in TEMPLATES] for facet in FACETS
}
_EXTREME_PATTERNS = [_pattern(f) for f in EXTREMES.values()]


def _body(text: str) -> str:
    return text.split("Reported events:", 1)[0]


def parse_caption_numbers(text: str) -> dict[str, float]:
    """Read back the numbers of a caption (any template, whole or in a `caption_target` form, generated or not).

    Args:
        text: a caption; a sentence that does not match a template exactly is skipped, the first match of each
            facet wins.

    Returns:
        Those present of the `QUANTITIES` keys, `t2m_anomaly_c` (signed), and `wind_component_max_m_s` /
        `precip_peak_mm_day` when notable. `wind_dir_deg` is the centre of the compass point.

    Examples:
        >>> parse_caption_numbers("Mean sea-level pressure was 1013.2 hPa. Area-mean precipitation: 0.4 mm.")
        {'slp_hpa': 1013.2, 'precip_mm': 0.4}
    """
    body = _body(text)
    out: dict[str, float] = {}
    for facet in FACETS:
        for pattern in _PATTERNS[facet]:
            match = pattern.search(body)
            if match is None:
                continue
            groups = match.groupdict()
            for name, value in groups.items():
                if name in FIELD_KEYS and value is not None:
                    out.setdefault(FIELD_KEYS[name], float(value))
            if groups.get("sign") == "colder":
                out["t2m_anomaly_c"] = -abs(out["t2m_anomaly_c"])
            if groups.get("dir") in COMPASS:
                out.setdefault("wind_dir_deg", COMPASS.index(groups["dir"]) * 22.5)
            break
    for pattern in _EXTREME_PATTERNS:
        match = pattern.search(body)
        if match is not None:
            for name, value in match.groupdict().items():
                if name in ("wmax", "peak") and value is not None:
                    out.setdefault(FIELD_KEYS[name], float(value))
    return out


def canonical_caption(text: str, facets: Iterable[str] = NUMBER_FACETS) -> str:
    """The caption's number sentences rewritten in ONE phrasing (template 0's), numbers copied verbatim.

    The builder picks one of three phrasings per sample from a hash of its key, which nothing in the climate can
    predict; a model trained on the raw sentences learns a blend that no template parses. The canonical form keeps
    the numbers (as written) in a fixed phrasing and order. A caption without any of the sentences is returned
    stripped.

    Raises:
        ContractError: an unknown facet.
    """
    body = _body(text)
    out: list[str] = []
    for facet in facets:
        if facet not in _PATTERNS:
            raise ContractError(f"caption facet {facet!r} is unknown; use some of {', '.join(FACETS)}")
        for pattern in _PATTERNS[facet]:
            match = pattern.search(body)
            if match is None:
                continue
            groups = {k: v for k, v in match.groupdict().items() if v is not None}
            sentence = TEMPLATES[0][facet]
            fields = {name: groups[name] for name in groups if name in FIELD_KEYS}
            if "dirp" in sentence:
                fields["dirp"] = f"from the {groups['dir']}" if "dir" in groups else "with no prevailing direction"
            if "sign" in groups:
                fields["sign"] = groups["sign"]
            if "{period}" in sentence:
                period = re.search(r"than the (.+?) average", match.group(0))
                fields["period"] = period.group(1) if period else ""
            out.append(sentence.format(**fields))
            break
    return " ".join(out) if out else text.strip()


def caption_target(text: str, form: str = "full") -> str:
    """The caption in one of `CAPTION_FORMS`: whole, or its number (or temperature) sentences in one phrasing.

    Raises:
        ContractError: an unknown form.
    """
    if form not in CAPTION_FORMS:
        raise ContractError(f"caption form {form!r} is unknown; use one of {', '.join(CAPTION_FORMS)}")
    facets = CAPTION_FORMS[form]
    return text if facets is None else canonical_caption(text, facets)
