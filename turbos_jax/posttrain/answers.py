r"""Answer-consistency checker: the final answer of a response, compared with a reference.

The binary reward of GRPO and the exact-match metric of evaluation:
`is_correct(response, reference) = answers_match(extract_answer(response), reference)`.
None of the public functions raises, whatever the input (a reward must not crash the trainer):
a failure inside counts as "no answer" / "no match".

`extract_answer(text)` takes the first rule that applies:
1. the content of the last `\boxed{...}` (or `\fbox{...}`) to close, braces nested to any depth
   (so the outer of nested boxes); else the token after the last `\boxed ` (MATH's brace-less form);
2. the rest of the line after the last `####` (GSM8K, and this package's arithmetic task);
3. the rest of the line after the last "answer is" / "answer:" (any case: "The final answer is 7.");
4. the last number in the text (signed, decimal, scientific, `1,000` grouping, `a/b`).
A marker with nothing after it (`"#### "`) gives None: the response named no answer, and taking an
earlier number would credit work the response did not claim. No match at all also gives None.

`normalise(text)` gives the canonical form that `answers_match` compares:
* Unicode NFKC (full-width digits, `½` -> `1/2`), the minus sign `−` read as `-`.
* LaTeX wrappers removed: `$`, `\(` `\)` `\[` `\]`, `\boxed{}`, `\text{}` (and `\textbf`, `\mathrm`,
  `\mathbf`, `\mbox`, `\fbox`), `\left` / `\right`, spacing (`\,` `\;` `\!` `~`); `\frac{a}{b}`,
  `\dfrac`, `\tfrac` and `\frac34` become `a/b`; `\%` `\$` become `%` `$`.
* A single leading `x =` (a name and "=") is dropped; so are a trailing full stop and surrounding
  whitespace.
* Units: a currency sign before or after a number (`€ £ ¥`; `$` is removed everywhere, being also
  LaTeX's math delimiter) and one trailing unit word from `UNITS` (lengths, masses, times, volumes,
  money words, degrees, percent; with a power `^2`, `²`, `2`, `^{3}`, ...) are stripped from a number:
  `normalise("12 cm") == normalise("12") == "12"`. Other words are kept, so `"12 apples"` is not a
  number and does not equal `"12"` (stripping any word would also accept `"12 wrong"`).
  `answers_match` compares units only when both sides name one: `"12 cm"` == `"12"` but
  `"12 cm"` != `"12 m"`. Units are not converted (`"1 m"` != `"100 cm"`).
* Percent is a unit: `"50%"` == `"50"`, and `"50%"` != `"0.5"` (references to percentage questions
  are usually written as the number of percent).
* Numbers are read exactly, as `fractions.Fraction`: `1,000` = `1 000` = `1000.0` = `1e3` =
  `1 \times 10^{3}` = `+1000`; `3/4` = `0.75` = `\frac{3}{4}` = `\dfrac34` = `(3)/(4)`; `-5` = `(-5)`.
  A number's canonical form is `p` or `p/q` in lowest terms (`normalise("0.75") == "3/4"`). There is
  no tolerance: `0.3333` != `1/3`, and repeating decimals are not recognised. Numbers with more
  than 1000 digits or exponents beyond ±1000 are left as text.
* Anything else is compared as text: lower case, whitespace runs collapsed to one space.
* An empty prediction never matches.

Left open (compared as text, so equivalent forms may be judged unequal): mixed numbers (`1 1/2`),
tuples, sets and intervals, algebraic expressions (`2x+1` vs `1+2x`), radicals and π, powers other
than `a \times 10^{k}`, compound units (`°C`, `km/h`), unit conversion, and number words ("five").
The arithmetic task needs none of them; a symbolic checker would be the place for them.
"""

from __future__ import annotations

import collections
import re
import unicodedata
from fractions import Fraction

# Canonical unit -> the spellings that mean it (compared in lower case, after a `^2`/`^3` power is
# split off).
_UNIT_ALIASES = {
    "mm": ("mm", "millimeter", "millimeters", "millimetre", "millimetres"),
    "cm": ("cm", "centimeter", "centimeters", "centimetre", "centimetres"),
    "m": ("m", "meter", "meters", "metre", "metres"),
    "km": ("km", "kilometer", "kilometers", "kilometre", "kilometres"),
    "in": ("in", "inch", "inches"),
    "ft": ("ft", "foot", "feet"),
    "yd": ("yd", "yard", "yards"),
    "mi": ("mi", "mile", "miles"),
    "mg": ("mg", "milligram", "milligrams"),
    "g": ("g", "gram", "grams"),
    "kg": ("kg", "kilogram", "kilograms"),
    "lb": ("lb", "lbs", "pound", "pounds"),
    "oz": ("oz", "ounce", "ounces"),
    "ms": ("ms", "millisecond", "milliseconds"),
    "s": ("s", "sec", "secs", "second", "seconds"),
    "min": ("min", "mins", "minute", "minutes"),
    "h": ("h", "hr", "hrs", "hour", "hours"),
    "day": ("day", "days"),
    "week": ("week", "weeks"),
    "month": ("month", "months"),
    "year": ("year", "years"),
    "ml": ("ml", "milliliter", "milliliters", "millilitre", "millilitres"),
    "l": ("l", "liter", "liters", "litre", "litres"),
    "$": ("$", "dollar", "dollars", "usd"),
    "cent": ("cent", "cents"),
    "€": ("€", "euro", "euros", "eur"),
    "£": ("£",),
    "¥": ("¥", "yen"),
    "°": ("°", "deg", "degree", "degrees"),
    "%": ("%", "percent"),
}
UNITS = {alias: unit for unit, aliases in _UNIT_ALIASES.items() for alias in aliases}
_CURRENCY = "$€£¥"
_MAX_DIGITS = 1000
_MAX_EXPONENT = 1000

# --------------------------------------------------------------------------------- extraction
_BRACE_TOKEN = re.compile(r"\\(?:boxed|fbox)\s*\{|\\[{}]|[{}]")
_BOXED_BARE = re.compile(r"\\boxed\s+([^\s$]+)")
_ANSWER_IS = re.compile(r"answer\s*(?:is\b\s*:?|:)", re.IGNORECASE)
_NUMBER_IN_TEXT = re.compile(r"[-+−]?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?(?:/\d+)?")


def _last_match(pattern: re.Pattern, text: str) -> re.Match | None:
    tail = collections.deque(pattern.finditer(text), maxlen=1)
    return tail[0] if tail else None


def _last_boxed(text: str) -> str | None:
    """The content of the `\\boxed{...}` that closes last; one pass with a stack."""
    stack, found = [], None
    for m in _BRACE_TOKEN.finditer(text):
        token = m.group()
        if token in ("\\{", "\\}"):
            continue
        if token == "}":
            if stack:
                start = stack.pop()
                if start is not None:  # the box that closes last: the outer one of nested boxes
                    found = (start, m.start())
        else:
            stack.append(m.end() if token != "{" else None)
    if found is not None:
        return text[found[0] : found[1]]
    bare = _last_match(_BOXED_BARE, text)
    return bare.group(1) if bare is not None else None


def _rest_of_line(text: str, start: int) -> str | None:
    line = text[start:].split("\n", 1)[0].strip().strip("*").strip()
    line = line.removesuffix(".").strip()
    return line or None


def _extract(text: str) -> str | None:
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip() or None
    marker = text.rfind("####")
    if marker >= 0:
        return _rest_of_line(text, marker + 4)
    phrase = _last_match(_ANSWER_IS, text)
    if phrase is not None:
        return _rest_of_line(text, phrase.end())
    number = _last_match(_NUMBER_IN_TEXT, text)
    if number is None:
        return None
    value = number.group()
    before = text[number.start() - 1] if number.start() > 0 else " "
    if value[0] in "+-−" and (before.isalnum() or before in ")]}"):  # "10-3": the 3, not -3
        value = value[1:]
    return value


def extract_answer(text: str) -> str | None:
    """The final answer in `text` (rules in the module docstring), or None if it names none."""
    if not isinstance(text, str):
        return None
    try:
        return _extract(text)
    except Exception:  # never raise inside a reward function
        return None


# ----------------------------------------------------------------------------- normalisation
_WRAPPER_TOKEN = re.compile(r"\\(?:boxed|fbox|text|textbf|textit|textrm|mathrm|mathbf|mbox)\s*\{|\\[{}]|[{}]")
_FRAC_BRACED = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_FRAC_DIGITS = re.compile(r"\\[dt]?frac\s*(\d)\s*(\d)")
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![a-zA-Z])")
_SPACING = re.compile(r"\\[,;:! ]|~")
_ASSIGNMENT = re.compile(r"^[a-zA-Z]\w{0,20}\s*=\s*(?=\S)")
_POWER_OF_TEN = re.compile(r"^(.+?)\s*(?:\\times|\\cdot|\*|×)\s*10\s*\^\s*\{?\s*([-+]?\d{1,6})\s*\}?$")
_UNIT_SUFFIX = re.compile(r"^(.*?\d\)?)\s*([^\W\d]+|[$€£¥%°])\s*(\^?\s*\{?[23]\}?)?$")
_DECIMAL = re.compile(
    r"(?P<int>\d{1,3}(?:,\d{3})+|\d{1,3}(?: \d{3})+|\d*)(?:\.(?P<frac>\d*))?(?:[eE](?P<exp>[-+]?\d{1,6}))?"
)


def _unwrap(s: str) -> str:
    """Replaces each `\\text{X}`-like wrapper by X, in one pass (an unclosed one loses its command)."""
    stack, cuts = [], []
    for m in _WRAPPER_TOKEN.finditer(s):
        token = m.group()
        if token in ("\\{", "\\}"):
            continue
        if token == "}":
            opened = stack.pop() if stack else None
            if opened is not None:
                cuts += [opened, m.span()]
        else:
            stack.append(None if token == "{" else m.span())
    cuts += [span for span in stack if span is not None]
    pieces, pos = [], 0
    for start, end in sorted(cuts):
        pieces.append(s[pos:start])
        pos = end
    return "".join(pieces) + s[pos:]


def _clean(text: str) -> str:
    s = unicodedata.normalize("NFKC", text).replace("⁄", "/").replace("−", "-")
    s = _unwrap(s)
    s = s.replace("\\%", "%").replace("\\$", "$")
    for token in ("$", "\\(", "\\)", "\\[", "\\]"):
        s = s.replace(token, "")
    s = _LEFT_RIGHT.sub("", s)
    s = _SPACING.sub(" ", s)
    s = s.replace("^{\\circ}", "°").replace("^\\circ", "°")
    for _ in range(4):  # nested \frac{\frac{1}{2}}{3} resolves from the inside out
        s = _FRAC_DIGITS.sub(r"\1/\2", _FRAC_BRACED.sub(r"(\1)/(\2)", s))
    s = " ".join(s.split()).removesuffix(".").strip()
    return _ASSIGNMENT.sub("", s, count=1)


def _strip_parens(s: str) -> str:
    s = s.strip()
    while len(s) >= 2 and s[0] == "(" and s[-1] == ")" and "(" not in s[1:-1] and ")" not in s[1:-1]:
        s = s[1:-1].strip()
    return s


def _decimal(s: str) -> Fraction | None:
    """A signed decimal or scientific literal, exactly; None if `s` is not one."""
    s = _strip_parens(s)
    sign = 1
    if s[:1] in "+-" and s:
        sign, s = (-1 if s[0] == "-" else 1), _strip_parens(s[1:])
    m = _DECIMAL.fullmatch(s)
    if m is None:
        return None
    whole = m.group("int").replace(",", "").replace(" ", "")
    frac = m.group("frac") or ""
    exp = int(m.group("exp") or 0)
    if not whole + frac or len(whole) + len(frac) > _MAX_DIGITS or abs(exp) > _MAX_EXPONENT:
        return None
    value = Fraction(int(whole + frac), 10 ** len(frac))
    return sign * value * Fraction(10) ** exp


def _number(s: str) -> Fraction | None:
    """`s` as an exact number: a decimal, `a/b`, or `a \\times 10^{k}`; None otherwise."""
    if not s:
        return None
    m = _POWER_OF_TEN.match(s)
    if m is not None:
        mantissa, exp = _decimal(m.group(1)), int(m.group(2))
        if mantissa is None or abs(exp) > _MAX_EXPONENT:
            return None
        return mantissa * Fraction(10) ** exp
    sign = 1
    if s[0] in "+-" and "/" in s:  # -3/4, -(3)/(4)
        sign, s = (-1 if s[0] == "-" else 1), s[1:]
    parts = s.split("/")
    if len(parts) == 2:
        num, den = _decimal(parts[0]), _decimal(parts[1])
        if num is None or den is None or den == 0:
            return None
        return sign * num / den
    return _decimal(s) if len(parts) == 1 else None


def _analyse(text: str) -> tuple[str, Fraction | None, str | None]:
    """(canonical text, exact value or None, canonical unit or None)."""
    s = _clean(text)
    value = _number(s)
    unit = None
    if value is None and s:
        core = s
        if core[0] in _CURRENCY:
            unit, core = core[0], core[1:].strip()
        elif core[-1] in _CURRENCY:
            unit, core = core[-1], core[:-1].strip()
        else:
            m = _UNIT_SUFFIX.match(core)
            if m is not None and m.group(2).lower() in UNITS:
                power = (m.group(3) or "").strip("^{} ")
                unit = UNITS[m.group(2).lower()] + (f"^{power}" if power else "")
                core = m.group(1)
        value = _number(core.strip()) if unit is not None else None
        if value is None:
            unit = None
    if value is not None:
        canonical = (
            str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
        )
        return canonical, value, unit
    return s.lower(), None, None


def normalise(text: str) -> str:
    """The canonical form of an answer (rules in the module docstring); "" for non-strings."""
    if not isinstance(text, str):
        return ""
    try:
        return _analyse(text)[0]
    except Exception:  # never raise inside a reward function
        return ""


def _match(predicted: str, reference: str) -> bool:
    p_text, p_value, p_unit = _analyse(predicted)
    r_text, r_value, r_unit = _analyse(reference)
    if not p_text:
        return False
    if p_value is not None and r_value is not None:
        return p_value == r_value and (p_unit is None or r_unit is None or p_unit == r_unit)
    return p_value is None and r_value is None and p_text == r_text


def answers_match(predicted: str | None, reference: str) -> bool:
    """Whether an extracted answer equals the reference after `normalise` (exact, no tolerance)."""
    if not isinstance(predicted, str) or not isinstance(reference, str):
        return False
    try:
        return _match(predicted, reference)
    except Exception:  # never raise inside a reward function
        return False


def is_correct(response: str, reference: str) -> bool:
    """The binary reward: the response's extracted final answer matches the reference."""
    return answers_match(extract_answer(response), reference)
