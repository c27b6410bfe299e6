"""One vocabulary of findings across sources, and tasks: the only place a finding becomes a label.

Sources name the same thing differently (ieee8023 writes ``No Finding``, darkcovidnet's folder is
``No_findings``, a hospital's manifest may say ``normal``), and upstream findings are flat
(``COVID-19, ARDS``) or hierarchical (``Pneumonia/Viral/COVID-19``). :func:`normalise_finding` maps every
spelling to one term and :func:`category` sorts a finding into ``covid``, ``normal``, ``pneumonia``
(any other pneumonia) or ``other``. Dataset versions keep the finding (task-neutral); a :class:`Task`
decides at training, evaluation and serving time which findings are the positive class, which the
negative, and which are not used - as torchxrayvision's ``relabel_dataset`` does for its sources.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

COVID = "COVID-19"
NO_FINDING = "No Finding"
PNEUMONIA = "Pneumonia"
CATEGORIES = ("covid", "normal", "pneumonia", "other")

UNLABELLED_FINDINGS = frozenset({"", "todo", "unknown"})
COVID_TOKENS = frozenset({"covid-19", "covid19", "covid 19", "covid", "sars-cov-2"})
NORMAL_TOKENS = frozenset({"no finding", "no findings", "nofinding", "normal", "no_finding", "no_findings"})
# Pneumonias other than COVID-19 as ieee8023 names them: flat names before 2020-07, the leaves of its
# ``Pneumonia/{Bacterial,Viral,Fungal,Lipoid}/...`` hierarchy after. Tuberculosis and ARDS are not here:
# upstream files them outside ``Pneumonia/``.
PNEUMONIA_TOKENS = frozenset(
    {
        "pneumonia",
        "bacterial",
        "viral",
        "fungal",
        "lipoid",
        "aspiration",
        "streptococcus",
        "staphylococcus",
        "klebsiella",
        "mycoplasma",
        "mycoplasma bacterial pneumonia",
        "legionella",
        "e.coli",
        "chlamydophila",
        "nocardia",
        "pneumocystis",
        "aspergillosis",
        "sars",
        "mers",
        "mers-cov",
        "varicella",
        "influenza",
        "herpes",
    }
)


class TaskError(ValueError):
    """A task that is unknown or whose definition file is invalid."""


def _parts(finding: str) -> set[str]:
    text = " ".join(finding.replace("_", " ").split()).casefold()
    return {text, *(part.strip() for part in re.split(r"[,/;|]", text))} - {""}


def _term(word: str) -> str:
    """A finding word in one spelling, folded: ``No_findings``, ``normal`` and ``No Finding`` meet."""
    return normalise_finding(word).casefold()


def normalise_finding(raw: str) -> str:
    """One spelling per finding: ``No_findings``/``normal`` -> ``No Finding``, ``Covid-19`` -> ``COVID-19``,
    ``pneumonia`` -> ``Pneumonia``; anything else keeps its own words (whitespace collapsed)."""
    text = " ".join(raw.replace("_", " ").split())
    folded = text.casefold()
    if folded in NORMAL_TOKENS:
        return NO_FINDING
    if folded in COVID_TOKENS:
        return COVID
    if folded == "pneumonia":
        return PNEUMONIA
    return text


def category(finding: str) -> str | None:
    """``covid``, ``normal``, ``pneumonia`` (non-COVID) or ``other``; None when unlabelled (``todo``).

    COVID-19 anywhere in a combined finding wins (``COVID-19, ARDS`` is covid).
    """
    parts = _parts(finding)
    if not parts or parts <= UNLABELLED_FINDINGS:
        return None
    if parts & COVID_TOKENS or any(_names(part, COVID_TOKENS) for part in parts):
        return "covid"
    if parts & NORMAL_TOKENS:
        return "normal"
    if parts & PNEUMONIA_TOKENS or any(_names(part, {"pneumonia"}) for part in parts):
        return "pneumonia"
    return "other"


def _names(part: str, words: set[str] | frozenset[str]) -> bool:
    """Whether a finding phrase names one of ``words`` (``covid-19 pneumonia``, ``viral pneumonia``: class
    folders and manifests write phrases), unless it is negated (``no pneumonia``, ``non covid``)."""
    said = ["", *part.split()]
    negated = ("no", "not", "non")
    return any(said[i] in words and said[i - 1] not in negated for i in range(1, len(said)))


@dataclass(frozen=True)
class Task:
    """Which findings are the positive class, which the negative, the rest not used.

    ``positive`` and ``negative`` hold categories (``covid``, ``normal``, ``pneumonia``, ``other``) or
    finding words (matched, case-insensitively, against the whole finding or any of its ``,``/``/`` parts);
    ``negative = ("rest",)`` takes every labelled finding the positive side does not.
    """

    name: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    positive_name: str
    negative_name: str

    def _matches(self, finding: str, terms: tuple[str, ...]) -> bool:
        kind, parts = category(finding), {_term(part) for part in _parts(finding)}
        return any(term.casefold() == kind or _term(term) in parts for term in terms)

    def label_of(self, finding: str) -> int | None:
        """1 (positive), 0 (negative) or None (not used by this task, or unlabelled)."""
        if category(finding) is None:
            return None
        if self._matches(finding, self.positive):
            return 1
        if self.negative == ("rest",) or self._matches(finding, self.negative):
            return 0
        return None

    def label_name(self, label: int) -> str:
        return self.positive_name if label == 1 else self.negative_name

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


BUILTIN_TASKS = {
    task.name: task
    for task in (
        Task("covid-vs-rest", ("covid",), ("rest",), "COVID-19", "other finding"),
        Task("covid-vs-normal", ("covid",), ("normal",), "COVID-19", "no finding"),
        Task("covid-vs-pneumonia", ("covid",), ("pneumonia",), "COVID-19", "other pneumonia"),
    )
}
DEFAULT_TASK = "covid-vs-rest"


def resolve_task(spec: str | Task | dict | None = None) -> Task:
    """The task named by ``--task``: a built-in name, a YAML/JSON file, a definition's JSON text
    (:func:`portable_task`), or a card's recorded dict.

    A task file reads::

        name: covid-vs-bacterial
        positive: [covid]
        negative: [Bacterial, Streptococcus]   # or: rest
        positive_name: COVID-19                 # optional
        negative_name: bacterial pneumonia      # optional

    Values are read as written (:func:`lxn_ray.sources.yamltext.load_text_yaml`): ``positive: [Yes]`` is the
    finding ``Yes`` and ``name: 1.10`` the name ``1.10``, never a boolean or a number.

    Raises :class:`TaskError` for an unknown name or an invalid file.
    """
    if spec is None:
        return BUILTIN_TASKS[DEFAULT_TASK]
    if isinstance(spec, Task):
        return spec
    if isinstance(spec, dict):
        if "positive" not in spec and spec.get("name") in BUILTIN_TASKS:
            return BUILTIN_TASKS[spec["name"]]  # a card that recorded a built-in task by name only
        return _task_from_mapping(spec, "recorded task")
    if spec in BUILTIN_TASKS:
        return BUILTIN_TASKS[spec]
    if spec.lstrip().startswith("{"):
        try:
            return _task_from_mapping(json.loads(spec), "task definition")
        except json.JSONDecodeError as error:
            raise TaskError(f"not a readable task definition ({error})") from None
    path = Path(spec).expanduser()
    if not path.is_file():
        raise TaskError(f"unknown task {spec!r}: expected one of {sorted(BUILTIN_TASKS)} or a task file")
    import yaml

    from lxn_ray.sources.yamltext import load_text_yaml

    try:
        definition = load_text_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise TaskError(f"{path}: not a readable task file ({error})") from None
    return _task_from_mapping(definition, str(path))


def portable_task(spec: str) -> str:
    """``spec`` as any process can read it: a built-in name as is, a task file as its definition (JSON
    text, which :func:`resolve_task` reads back), so that Tune trials - which run in their own directory -
    and workers on nodes without the file read the task the driver read. The settings' ``--task`` flags
    parse with it. Raises :class:`TaskError` (a ``ValueError``) as :func:`resolve_task` does."""
    task = resolve_task(spec)
    if spec in BUILTIN_TASKS:
        return spec
    return json.dumps(task.as_dict(), sort_keys=True)


def task_name(spec: str) -> str:
    """The name of the task ``spec`` names (a built-in name, task file or definition)."""
    return resolve_task(spec).name


def _task_from_mapping(definition: Any, where: str) -> Task:
    if not isinstance(definition, dict):
        raise TaskError(f"{where}: a task is a mapping with name, positive and negative")

    def terms(key: str) -> tuple[str, ...]:
        value = definition.get(key)
        if isinstance(value, str):
            value = [value]
        if not value or not all(isinstance(term, str) and term.strip() for term in value):
            raise TaskError(f"{where}: {key!r} must be a non-empty list of findings or categories")
        if any(term.strip().casefold() == "rest" for term in value):
            if key != "negative" or len(value) != 1:
                raise TaskError(f"{where}: 'rest' stands alone, and only as the negative side")
            return ("rest",)
        return tuple(term.strip() for term in value)

    name = definition.get("name")
    if not isinstance(name, str) or not name.strip():
        raise TaskError(f"{where}: a task needs a name")
    positive, negative = terms("positive"), terms("negative")
    overlap = [t for t in positive if _term(t) in {_term(n) for n in negative}]
    if overlap:
        raise TaskError(f"{where}: {sorted(overlap)} on both sides")
    return Task(
        name=name.strip(),
        positive=positive,
        negative=negative,
        positive_name=str(definition.get("positive_name") or ", ".join(positive)),
        negative_name=str(definition.get("negative_name") or ", ".join(negative)),
    )
