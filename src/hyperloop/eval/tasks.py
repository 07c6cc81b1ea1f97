"""The paper's zero-shot tasks (spec section 6) as lm-evaluation-harness defines them.

Each task turns one document (a JSON object in the field layout of the HF dataset lm-eval reads)
into an `Example`: the (context, continuation) strings to score, the gold choice, and the choice
strings lm-eval's `acc_norm` divides by. Written from the task definitions of lm-eval 0.4
(lm_eval/tasks/<task>/...): prompt text, choices, target, which continuation is scored, and the
split. Zero-shot only, with lm-eval's default target delimiter " " between context and choice.

Documents come from `<tasks_dir>/<task>/<split>.jsonl`, or from the HF hub through `datasets` when
no such file exists and the hub is reachable.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from hyperloop.errors import HyperloopError

DELIMITER = " "  # lm-eval's target_delimiter: "context" + " " + "choice"


@dataclass(frozen=True)
class Example:
    requests: list[tuple[str, str]]  # (context, continuation) per choice; one pair for LAMBADA
    gold: int  # index of the correct choice (0 for LAMBADA)
    choices: list[str]  # lm-eval's doc_to_choice strings: acc_norm divides by their length in characters


@dataclass(frozen=True)
class Task:
    name: str
    split: str  # the split lm-eval scores
    hub: tuple[str, str | None]  # (dataset path, config name) on the HF hub
    build: Callable[[dict], Example]
    acc_norm: bool  # lm-eval reports acc_norm (character-length normalised) for this task
    token_norm: bool = False  # the paper scores this task by log-likelihood per token (spec 6)
    greedy: bool = False  # LAMBADA: accuracy is "the target is the greedy continuation", plus perplexity

    @property
    def paper_metric(self) -> str:
        return "acc_norm_tokens" if self.token_norm else "acc"


def _choices(ctx: str, choices: list[str], gold: int) -> Example:
    return Example([(ctx, DELIMITER + c) for c in choices], gold, choices)


# ----------------------------------------------------------------------------- doc -> Example
def arc(doc: dict) -> Example:
    labels = doc["choices"]["label"]
    return _choices(f"Question: {doc['question']}\nAnswer:", doc["choices"]["text"], labels.index(doc["answerKey"]))


def piqa(doc: dict) -> Example:
    return _choices(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def _hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag preprocessing: WikiHow '[title]' markers become sentence breaks, other
    bracketed artefacts go, double spaces collapse."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(doc: dict) -> Example:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = _hellaswag_clean(doc["activity_label"] + ": " + ctx)
    return _choices(query, [_hellaswag_clean(e) for e in doc["endings"]], int(doc["label"]))


def openbookqa(doc: dict) -> Example:
    labels = doc["choices"]["label"]
    return _choices(doc["question_stem"], doc["choices"]["text"], labels.index(doc["answerKey"].lstrip()))


def sciq(doc: dict) -> Example:
    ctx = f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:"
    choices = [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]
    return _choices(ctx, choices, 3)


def copa(doc: dict) -> Example:
    """The premise loses its final period and gains " because" / " therefore"; each choice gets a
    leading space and a lower-case first letter, so with the delimiter it follows two spaces."""
    connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
    ctx = doc["premise"].strip()[:-1] + f" {connector}"
    choices = [" " + c[0].lower() + c[1:] for c in (doc["choice1"], doc["choice2"])]
    return _choices(ctx, choices, int(doc["label"]))


def winogrande(doc: dict) -> Example:
    """Partial scoring: each option fills the blank in its own context, and the shared suffix after
    the blank is the continuation scored under each."""
    sentence = doc["sentence"]
    blank = sentence.index("_")
    contexts = [sentence[:blank] + option for option in (doc["option1"], doc["option2"])]
    suffix = sentence[blank + 1 :].strip()
    return Example([(c, DELIMITER + suffix) for c in contexts], {"1": 0, "2": 1}[doc["answer"]], contexts)


def race(doc: dict) -> Example:
    """The article, then the earlier questions of the same article answered, then the last question;
    fill-in questions ending in '  _  .' get their answer spliced in instead of a Q/A pair."""
    problems = doc["problems"]
    problems = ast.literal_eval(problems) if isinstance(problems, str) else problems

    def answer(problem: dict) -> str:
        return problem["options"]["ABCD".index(problem["answer"])]

    text = "Article: " + doc["article"] + "\n\n"
    for problem in problems[:-1]:
        if problem["question"][-6:] == "  _  .":
            text += problem["question"][:-5] + answer(problem) + "\n"
        else:
            text += "Question: " + problem["question"] + "\n" + "Answer: " + answer(problem) + "\n"
    last = problems[-1]
    text += last["question"]
    return _choices(text, list(last["options"][:4]), "ABCD".index(last["answer"]))


def lambada(doc: dict) -> Example:
    """Everything but the last space-separated word, then " " + that word."""
    words = doc["text"].split(" ")
    return Example([(" ".join(words[:-1]), " " + words[-1])], 0, [words[-1]])


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("arc_easy", "test", ("allenai/ai2_arc", "ARC-Easy"), arc, acc_norm=True),
        Task("arc_challenge", "test", ("allenai/ai2_arc", "ARC-Challenge"), arc, acc_norm=True),
        Task("copa", "validation", ("aps/super_glue", "copa"), copa, acc_norm=False),
        Task("hellaswag", "validation", ("Rowan/hellaswag", None), hellaswag, acc_norm=True, token_norm=True),
        Task("lambada_openai", "test", ("EleutherAI/lambada_openai", "default"), lambada, acc_norm=False, greedy=True),
        Task("lambada_standard", "test", ("cimec/lambada", None), lambada, acc_norm=False, greedy=True),
        Task("openbookqa", "test", ("allenai/openbookqa", "main"), openbookqa, acc_norm=True, token_norm=True),
        Task("piqa", "validation", ("baber/piqa", None), piqa, acc_norm=True, token_norm=True),
        Task("race", "test", ("EleutherAI/race", "high"), race, acc_norm=False),
        Task("sciq", "test", ("allenai/sciq", None), sciq, acc_norm=True),
        Task("winogrande", "validation", ("allenai/winogrande", "winogrande_xl"), winogrande, acc_norm=False),
    ]
}


def resolve_tasks(spec: str) -> tuple[list[Task], bool]:
    """'all', 'none' or a comma list of names -> (tasks, whether they were named explicitly)."""
    if spec == "all":
        return list(TASKS.values()), False
    if spec == "none":
        return [], True
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise HyperloopError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)} (or all / none)")
    return [TASKS[n] for n in names], True


# ----------------------------------------------------------------------------------- loading
def _read_jsonl(path: Path) -> list[dict]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    docs.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise HyperloopError(f"{path}:{line_no} is not valid JSON ({err.msg})") from None
    return docs


@functools.cache
def hub_reachable() -> bool:
    """One quick TCP probe of the hub, so an offline machine fails in seconds instead of sitting in
    `datasets`' retry loop (about 25 s per dataset); the HF offline switches are honoured."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", ""):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


def _from_hub(task: Task, split: str) -> list[dict]:
    """The split through HF `datasets`; raises HyperloopError when that cannot work here."""
    if not hub_reachable():
        raise HyperloopError("the HF hub is not reachable (or HF_HUB_OFFLINE is set)")
    try:
        import datasets
    except ImportError:
        raise HyperloopError("the `datasets` package is not installed") from None
    path, name = task.hub
    try:
        return [dict(d) for d in datasets.load_dataset(path, name, split=split)]
    except Exception as err:  # noqa: BLE001  (offline, unknown split, hub errors: datasets raises many types)
        first_line = (str(err).splitlines() or [type(err).__name__])[0][:120]
        raise HyperloopError(f"HF hub dataset {path} ({split}) could not be loaded: {first_line}") from None


def load_docs(task: Task, tasks_dir: str | Path | None, use_hub: bool = True) -> tuple[list[dict], str]:
    """(documents, split actually read). Tries `<tasks_dir>/<task>/<split>.jsonl`, then the hub; when
    lm-eval's split is nowhere but the folder has another split (SciQ's test answers are not public
    offline), that one is used and named in the result."""
    folder = Path(tasks_dir) / task.name if tasks_dir is not None else None
    if folder is not None and (folder / f"{task.split}.jsonl").is_file():
        return _read_jsonl(folder / f"{task.split}.jsonl"), task.split
    reasons = [f"no {folder / (task.split + '.jsonl')}" if folder is not None else "no --tasks-dir given"]
    if use_hub:
        try:
            return _from_hub(task, task.split), task.split
        except HyperloopError as err:
            reasons.append(str(err))
    # Another held-out split of the folder, validation first; never train.
    others = sorted(folder.glob("*.jsonl"), key=lambda p: (p.stem != "validation", p.stem)) if folder and folder.is_dir() else []
    others = [p for p in others if p.stem != "train"]
    if others:
        return _read_jsonl(others[0]), others[0].stem
    raise HyperloopError(f"task {task.name}: {'; '.join(reasons)}; pass --tasks-dir DIR holding {task.name}/{task.split}.jsonl")


def examples(task: Task, docs: list[dict]) -> list[Example]:
    """Build every example, with a one-line error naming the first document that does not fit."""
    out = []
    for i, doc in enumerate(docs):
        try:
            out.append(task.build(doc))
        except (KeyError, ValueError, IndexError, TypeError, SyntaxError) as err:
            raise HyperloopError(
                f"task {task.name}: document {i} does not have the fields lm-eval's {task.name} reads "
                f"({type(err).__name__}: {err})"
            ) from None
    return out
