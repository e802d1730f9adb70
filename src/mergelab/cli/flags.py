"""Which command-line flag sets which library option.

Library errors name the Python keyword or recipe field that fixes a problem and carry
it as `MergeError.option` (see mergelab.errors); `hint` turns it into the flag a user
of the `mergelab` command types, and `cli.common.fail` adds it to the message.
"""

from __future__ import annotations

import re

# library keyword / recipe field -> the flag (with its value, where one helps)
OPTION_FLAGS: dict[str, str] = {
    "allow_crimes": "--allow-crimes",
    "allow_missing_tensors": "--allow-missing-tensors",
    "allow_nonfinite": "--allow-nonfinite",
    "skip_unstable": "--skip-unstable",
    "overwrite": "--overwrite",
    "offline": "--offline",
    "every": "--every",
    "last": "--last",
    "device": "--device",
    "seed": "--seed",
    "base": "--base",
    "model": "--model module:factory",
    "model_factory": "--model module:factory",
    "data": "--data",
    "text": "--text FILE",
    "tokens": "--tokens F.pt",
    "tokenizer": "--tokenizer DIR",
    "bn_data": "--bn-data",
    "budget": "--budget",
    "workers": "--workers",
    "objective": "--objective METRIC[:max|:min]",
    "objectives": "--objective METRIC[:max|:min]",
    "sampler": "--sampler",
    "study_name": "--study-name",
    "vary": "--vary FIELD=GRID",
    "zipped": "--zip",
    "allow_all_same": "--i-understand-this-is-not-useful-without-training",
    "granularity": "--granularity task|layer",
    "head": "--head lm|classification",
    "steps": "--steps",
}


def hint(option: str | None) -> str | None:
    """The flag of `option`, or None when the command line has none."""
    return OPTION_FLAGS.get(option) if option else None


def with_flags(text: str, option: str | None = None) -> str:
    """`text` with the flag of `option` appended, unless it names it already.

    Without an option, the flags of the options `text` spells as `keyword=` (e.g.
    "skip_unstable=True" in a report's advice, or in one of a recipe's problems).
    """
    options = [option] if option else [k for k in OPTION_FLAGS if re.search(rf"(?<![\w.]){k}=", text)]
    flags = [f for f in (hint(o) for o in options) if f and f.split()[0] not in text]
    return text + f" (on the command line: {', '.join(flags)})" if flags else text
