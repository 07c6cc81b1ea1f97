"""Evaluation (issue 6): the batched scorer against a plain per-request forward, perplexity against
exp(mean CE) by hand, the task prompts against lm-eval's definitions, per-example agreement with
lm-evaluation-harness itself through our adapter, the CLI, and bad-input errors.

The models are tiny (d=64) with a 512-token byte-level BPE trained here on the bundled corpus, so
no ../shared data is needed; the real task files are used for the lm-eval check when present.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from hyperloop.checkpoint import save_model
from hyperloop.cli import main as cli
from hyperloop.config import ModelConfig
from hyperloop.data.demo import demo_corpus_path
from hyperloop.data.loader import TokenData
from hyperloop.data.prepare import prepare
from hyperloop.data.tokenizer import load_tokenizer
from hyperloop.errors import HyperloopError
from hyperloop.eval.loglik import Request, score
from hyperloop.eval.perplexity import perplexity
from hyperloop.eval.runner import encode_requests, evaluate, run_task
from hyperloop.eval.tasks import TASKS, load_docs, resolve_tasks
from hyperloop.model import HyperloopLM

SHARED_TASKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tasks"
ARCHS = {
    "transformer": {"begin_layers": 0, "middle_layers": 3, "num_loops": 1, "end_layers": 0},
    "mhc": {"begin_layers": 0, "middle_layers": 3, "num_loops": 1, "end_layers": 0, "hc_placement": "sublayer", "h_res": "sinkhorn"},
    "looped": {"begin_layers": 1, "middle_layers": 1, "num_loops": 3, "end_layers": 1},
    "hyperloop": {"begin_layers": 1, "middle_layers": 1, "num_loops": 3, "end_layers": 1, "hc_placement": "span"},
}  # fmt: skip

# One document per task in the field layout lm-eval reads, with the requests its task definition
# produces (worked out by hand from lm_eval/tasks/*): context, " " + choice, gold.
DOCS = {
    "arc_easy": (
        {"id": "x", "question": "Which gas do plants absorb?", "choices": {"text": ["Oxygen", "Carbon dioxide"],
         "label": ["A", "B"]}, "answerKey": "B"},
        [("Question: Which gas do plants absorb?\nAnswer:", " Oxygen"),
         ("Question: Which gas do plants absorb?\nAnswer:", " Carbon dioxide")], 1),
    "copa": (
        {"premise": "The man turned on the faucet.", "choice1": "The toilet filled with water.",
         "choice2": "Water flowed from the spout.", "question": "effect", "label": 1},
        [("The man turned on the faucet therefore", "  the toilet filled with water."),
         ("The man turned on the faucet therefore", "  water flowed from the spout.")], 1),
    "hellaswag": (
        {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
         "endings": ["is using wrap [title] to wrap skis.", " [header] starts pulling up roofing."], "label": "1"},
        [("Roof shingle removal: A man is sitting on a roof. He", " is using wrap. to wrap skis."),
         ("Roof shingle removal: A man is sitting on a roof. He", "  starts pulling up roofing.")], 1),
    "lambada_openai": (
        {"text": "She poured the tea and handed him the cup"},
        [("She poured the tea and handed him the", " cup")], 0),
    "openbookqa": (
        {"id": "x", "question_stem": "Predators eat", "choices": {"text": ["lions", "bunnies"], "label": ["A", "B"]},
         "answerKey": " B"},
        [("Predators eat", " lions"), ("Predators eat", " bunnies")], 1),
    "piqa": (
        {"goal": "dresser", "sol1": "replace drawer with bobby pin ", "sol2": "finish, woodgrain", "label": 1},
        [("Question: dresser\nAnswer:", " replace drawer with bobby pin "),
         ("Question: dresser\nAnswer:", " finish, woodgrain")], 1),
    "race": (
        {"article": "Tom has a dog.", "problems": "[{'question': 'Tom has a  _  .', 'options': ['cat', 'dog', "
         "'cow', 'pig'], 'answer': 'B'}, {'question': 'Who has a dog?', 'options': ['Tom', 'Ann', 'Bob', 'Sue'], "
         "'answer': 'A'}]"},
        [("Article: Tom has a dog.\n\nTom has a dog\nWho has a dog?", " " + name) for name in ("Tom", "Ann", "Bob", "Sue")],
        0),
    "sciq": (
        {"question": "What do plants make?", "distractor1": "salt", "distractor2": "iron", "distractor3": "gold",
         "correct_answer": "sugar", "support": " Plants photosynthesize."},
        [("Plants photosynthesize.\nQuestion: What do plants make?\nAnswer:", " " + c)
         for c in ("salt", "iron", "gold", "sugar")], 3),
    "winogrande": (
        {"sentence": "Sarah was a better surgeon than Maria so _ got the easier cases.", "option1": "Sarah",
         "option2": "Maria", "answer": "2"},
        [("Sarah was a better surgeon than Maria so Sarah", " got the easier cases."),
         ("Sarah was a better surgeon than Maria so Maria", " got the easier cases.")], 1),
}  # fmt: skip


# ------------------------------------------------------------------------------------------ builders
def demo_texts(n: int) -> list[str]:
    table = pq.read_table(min(Path(demo_corpus_path()).glob("*.parquet")), columns=["text"])
    return table.column("text").to_pylist()[:n]


def make_tokenizer(folder: Path, texts: list[str], vocab: int = 512) -> Path:
    """A byte-level BPE (an HF tokenizer.json with <s>/</s>), fast to train and to run."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return folder


def tiny_config(arch: str = "hyperloop", **overrides) -> ModelConfig:
    base = {"name": f"{arch}-test", "vocab_size": 512, "dim": 64, "n_heads": 2, "ffn_dim": 192, "max_seq_len": 512}
    return ModelConfig(**{**base, **ARCHS[arch], **overrides})


def make_checkpoint(folder: Path, tokenizer_dir: Path, arch: str = "hyperloop", train_texts: list[str] = (),
                    steps: int = 0, **overrides) -> Path:  # fmt: skip
    """A checkpoint of a tiny model, trained `steps` AdamW steps (lr 3e-3) on `train_texts`."""
    torch.manual_seed(0)
    model = HyperloopLM(tiny_config(arch, **overrides))
    if steps:
        tok = load_tokenizer(tokenizer_dir)
        ids = torch.tensor([i for t in train_texts for i in [tok.bos_id] + tok.encode(t)])
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(0)
        for _ in range(steps):
            starts = torch.randint(0, len(ids) - 129, (4,), generator=gen)
            batch = torch.stack([ids[s : s + 129] for s in starts])
            loss = model(batch[:, :-1], batch[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return save_model(folder, model.eval(), tokenizer_dir=tokenizer_dir)


def write_tasks(folder: Path) -> Path:
    """DOCS as task files <task>/<lm-eval split>.jsonl, one document each."""
    for name, (doc, _, _) in DOCS.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / f"{TASKS[name].split}.jsonl").write_text(json.dumps(doc) + "\n")
    return folder


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [t[:4000] for t in demo_texts(60)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, texts) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tok", texts)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tok_dir, texts) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "trained", tok_dir, train_texts=texts, steps=25)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tok_dir, texts) -> Path:
    """A prepared folder: 20 documents for training, 4 short ones (about 2K tokens) for validation."""
    root = tmp_path_factory.mktemp("data")
    (root / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:20]))
    (root / "val.jsonl").write_text("".join(json.dumps({"text": t[:1500]}) + "\n" for t in texts[40:44]))
    prepare([str(root / "train.jsonl")], str(tok_dir), str(root / "prepared"), val_source=[str(root / "val.jsonl")],
            workers=1, progress=False)  # fmt: skip
    return root / "prepared"


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("tasks"))


# ------------------------------------------------------------------------------------------ scoring
def reference_score(model: HyperloopLM, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Plain definition: one forward per chunk of at most L continuation tokens over the L tokens
    before the chunk's last token (lm-eval's (ctx + cont)[-(L+1):][:-1]), log-softmax, sum."""
    L, full, total, greedy = model.cfg.max_seq_len, context + continuation, 0.0, True
    for begin in range(len(context), len(full), L):
        end = min(begin + L, len(full))
        window = full[max(0, end - L - 1) : end]
        with torch.no_grad():
            logprobs = model(torch.tensor([window[:-1]]))[0].double().log_softmax(-1)
        n = end - begin
        targets = torch.tensor(window[-n:])
        rows = logprobs[-n:]
        total += rows.gather(-1, targets[:, None]).sum().item()
        greedy &= bool((rows.argmax(-1) == targets).all())
    return total, greedy


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_scores_equal_a_plain_forward_per_request(arch):
    torch.manual_seed(1)
    model = HyperloopLM(tiny_config(arch, vocab_size=61, max_seq_len=24)).eval()
    gen = torch.Generator().manual_seed(2)

    def ids(n: int) -> list[int]:
        return torch.randint(0, 61, (n,), generator=gen).tolist()

    requests = []
    for n_ctx in (1, 9, 30):  # shared contexts; 30 > 24 is truncated on the left
        context = [1] + ids(n_ctx)
        requests += [Request(context, ids(n)) for n in (1, 1, 4, 11)]
    requests += [Request([1, 5], ids(60)), Request([1], ids(24)), Request(ids(3), [7])]  # chunked, exact fit
    scores = score(model, requests, batch_tokens=50, progress=False)  # small batches: several per run
    for request, got in zip(requests, scores):
        want, greedy = reference_score(model, list(request.context), list(request.continuation))
        assert got.logprob == pytest.approx(want, abs=2e-5)
        assert got.greedy == greedy and got.tokens == len(request.continuation)


def test_batch_size_does_not_change_scores():
    model = HyperloopLM(tiny_config("hyperloop", vocab_size=61, max_seq_len=32)).eval()
    requests = [Request([1, 2, 3][: 1 + i % 3], [4 + i % 50] * (1 + i % 5)) for i in range(40)]
    one = [s.logprob for s in score(model, requests, batch_tokens=1, progress=False)]
    many = [s.logprob for s in score(model, requests, batch_tokens=10_000, progress=False)]
    assert one == pytest.approx(many, abs=1e-5)


def test_greedy_flag_marks_exactly_the_argmax_continuation():
    model = HyperloopLM(tiny_config("looped", vocab_size=61, max_seq_len=32)).eval()
    context, greedy = [1, 9, 4], []
    with torch.no_grad():
        for _ in range(6):  # greedy decoding by full forwards
            greedy.append(int(model(torch.tensor([context + greedy]))[0, -1].argmax()))
    other = greedy[:3] + [(greedy[3] + 1) % 61] + greedy[4:]
    on, off = score(model, [Request(context, greedy), Request(context, other)], progress=False)
    assert on.greedy and not off.greedy and on.tokens == off.tokens == 6


# ------------------------------------------------------------------------------------------ perplexity
def test_perplexity_is_exp_of_mean_cross_entropy_by_hand(data_dir):
    cfg = tiny_config("hyperloop", max_seq_len=64)
    torch.manual_seed(3)
    model = HyperloopLM(cfg).eval()
    meta = json.loads((data_dir / "meta.json").read_text())
    split = meta["splits"]["validation"]
    stream = np.concatenate([np.fromfile(data_dir / s, dtype=np.dtype(meta["dtype"]).newbyteorder("<")).astype(np.int64)
                             for s in split["shards"]])  # fmt: skip
    T, n_windows = 64, (len(stream) - 1) // 64
    losses = []
    for i in range(n_windows):
        window = torch.from_numpy(stream[i * T : i * T + T + 1])
        with torch.no_grad():
            logits = model(window[None, :-1])[0].double()
        losses.append(F.cross_entropy(logits, window[1:], reduction="none"))
    by_hand = torch.cat(losses)
    got = perplexity(model, TokenData(data_dir), batch_tokens=200, progress=False)
    assert got["tokens"] == n_windows * T == by_hand.numel()
    assert got["loss"] == pytest.approx(by_hand.mean().item(), rel=1e-6)
    assert got["ppl"] == pytest.approx(math.exp(by_hand.mean().item()), rel=1e-5)
    capped = perplexity(model, TokenData(data_dir), max_tokens=3 * T + 5, progress=False)
    assert capped["tokens"] == 3 * T and capped["loss"] == pytest.approx(by_hand[: 3 * T].mean().item(), rel=1e-6)


# ------------------------------------------------------------------------------------------ tasks
@pytest.mark.parametrize("name", DOCS)
def test_task_requests_follow_lm_eval_definitions(name):
    doc, requests, gold = DOCS[name]
    example = TASKS[name].build(doc)
    assert example.requests == requests and example.gold == gold


def test_encode_requests_follows_lm_eval_encode_pair(tok_dir):
    tok = load_tokenizer(tok_dir)
    context, continuation = "The answer is ", "forty two"  # the trailing space moves to the continuation
    (request,) = encode_requests(tok, [(context, continuation)])
    whole, ctx = tok.encode("The answer is forty two"), tok.encode("The answer is")
    assert list(request.context) == [tok.bos_id] + ctx
    assert list(request.continuation) == whole[len(ctx) :]
    (empty,) = encode_requests(tok, [("", "Hello")])
    assert list(empty.context) == [tok.bos_id] and list(empty.continuation) == tok.encode("Hello")


def test_runner_metrics_from_logprobs(tok_dir, trained):
    """acc / acc_norm (per character) / acc_norm_tokens recomputed from the per-choice scores."""
    from hyperloop.checkpoint import load_model

    loaded = load_model(trained)
    docs = [DOCS["hellaswag"][0]] * 3 + [dict(DOCS["hellaswag"][0], label="0")]
    result = run_task(loaded.model, loaded.tokenizer(), TASKS["hellaswag"], docs, "validation", progress=False)
    lls, toks = np.array(result.logprobs), np.array(result.tokens)
    chars = np.array([[len(c) for c in TASKS["hellaswag"].build(d).choices] for d in docs])
    gold = np.array([1, 1, 1, 0])
    summary = result.summary()
    assert summary["acc"] == np.mean(lls.argmax(1) == gold)
    assert summary["acc_norm"] == np.mean((lls / chars).argmax(1) == gold)
    assert summary["acc_norm_tokens"] == np.mean((lls / toks).argmax(1) == gold)
    assert summary["score"] == summary["acc_norm_tokens"] and summary["n"] == 4


# ------------------------------------------------------------------------------------------ lm-eval
LM_EVAL_YAML = {
    "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml", "copa": "super_glue/copa/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml", "lambada_openai": "lambada/lambada_openai.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml", "piqa": "piqa/piqa.yaml", "race": "race/race.yaml",
    "sciq": "sciq/sciq.yaml", "winogrande": "winogrande/default.yaml",
}  # fmt: skip


def lm_eval_task_configs(folder: Path, tasks_dir: Path) -> dict[str, tuple[str, Path]]:
    """lm-eval's own task YAMLs (included as they ship) pointed at local JSON files: task -> (split, file)."""
    import lm_eval

    shipped = Path(lm_eval.__file__).parent / "tasks"
    found = {}
    for name, rel in LM_EVAL_YAML.items():
        try:
            docs_split = load_docs(TASKS[name], tasks_dir, use_hub=False)[1]
        except HyperloopError:
            continue
        split_keys = {"training_split": None, "validation_split": None, "test_split": None, f"{docs_split}_split": docs_split}
        config = {"include": str(shipped / rel), "task": f"local_{name}", "tag": [], "dataset_path": "json",
                  "dataset_name": None, "num_fewshot": 0,
                  "dataset_kwargs": {"data_files": {docs_split: str(tasks_dir / name / f"{docs_split}.jsonl")}},
                  **split_keys}  # fmt: skip
        (folder / f"local_{name}.yaml").write_text(json.dumps(config))
        found[name] = docs_split
    return found


def assert_lm_eval_agrees(results: dict, loaded, tasks_dir: Path, found: dict, limit: int, abs_ll: float) -> None:
    for name, split in found.items():
        task = TASKS[name]
        docs = load_docs(task, tasks_dir, use_hub=False)[0][:limit]
        ours = run_task(loaded.model, loaded.tokenizer(), task, docs, split, progress=False)
        samples = sorted(results["samples"][f"local_{name}"], key=lambda s: s["doc_id"])
        assert len(samples) == len(docs)
        pred, pred_norm = ours.predictions("none"), ours.predictions("chars")
        for i, sample in enumerate(samples):
            theirs = [resp[0] for resp in sample["filtered_resps"]] if not task.greedy else [sample["filtered_resps"][0][0]]
            assert theirs == pytest.approx(ours.logprobs[i], abs=abs_ll), (name, i)
            if task.greedy:
                assert sample["acc"] == float(ours.greedy[i][0]), (name, i)
            else:
                assert sample["acc"] == float(pred[i] == ours.gold[i]), (name, i)
                if "acc_norm" in sample:
                    assert sample["acc_norm"] == float(pred_norm[i] == ours.gold[i]), (name, i)


def real_tasks_where_present(folder: Path, inline: Path) -> Path:
    """The real task files of ../shared where it has them, the inline documents for the rest (RACE)."""
    if not SHARED_TASKS.is_dir():
        return inline
    folder.mkdir()
    for name in DOCS:
        (folder / name).symlink_to(SHARED_TASKS / name if (SHARED_TASKS / name).is_dir() else inline / name)
    return folder


def test_lm_eval_through_our_adapter_agrees_with_the_runner_per_example(trained, tasks_dir, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    import hyperloop.eval.harness  # noqa: F401  (registers --model hyperloop)
    from hyperloop.checkpoint import load_model

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source, limit = real_tasks_where_present(tmp_path / "tasks", tasks_dir), 6
    found = lm_eval_task_configs(tmp_path, source)
    assert set(found) == set(DOCS)
    results = lm_eval.simple_evaluate(model="hyperloop", model_args=f"checkpoint={trained}",
                                      tasks=[f"local_{n}" for n in found], task_manager=TaskManager(include_path=str(tmp_path)),
                                      limit=limit, log_samples=True)  # fmt: skip
    assert_lm_eval_agrees(results, load_model(trained), source, found, limit, abs_ll=1e-4)


def test_adapter_rolling_loglikelihood_and_generation(trained):
    pytest.importorskip("lm_eval")
    pytest.importorskip("hyperloop.infer.generate")
    from lm_eval.api.instance import Instance

    from hyperloop.eval.harness import HyperloopEvalLM

    lm = HyperloopEvalLM(checkpoint=str(trained))
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 80)  # longer than the 512-token context
    ids, L, bos = lm.tok.encode(text), lm.max_length, lm.tok.bos_id
    assert len(ids) > L
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    # by hand: BOS, then the tokens predicted L at a time, each from the L tokens before it at most
    by_hand = sum(reference_score(lm.model, [bos] + ids[:s], ids[s : s + L])[0] for s in range(0, len(ids), L))
    assert rolling == pytest.approx(by_hand, abs=1e-3)
    request = Instance("generate_until", {}, ("The history of", {"until": ["\n"], "max_gen_toks": 8}), 0)
    (out,) = lm.generate_until([request], disable_tqdm=True)
    assert isinstance(out, str) and "\n" not in out


# ------------------------------------------------------------------------------------------ CLI
def test_eval_cli_writes_table_and_json(trained, data_dir, tasks_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = cli(["eval", str(trained), "--data", str(data_dir), "--tasks", "all", "--tasks-dir", str(tasks_dir),
                "--offline", "--json", str(out)])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result["tasks"]) == set(DOCS) and result["tokens"] > 0 and math.isfinite(result["ppl"])
    for name, t in result["tasks"].items():
        assert {"acc", "acc_norm", "n"} <= set(t) and t["n"] == 1
        assert t["score"] == t[TASKS[name].paper_metric]
    assert "lambada_standard" in result["skipped"]  # not in tasks_dir, and --offline
    assert result["avg"] == pytest.approx(np.mean([t["score"] for t in result["tasks"].values()]))
    table = capsys.readouterr().out
    assert "perplexity" in table and "hellaswag" in table and "average" in table


def test_loops_override_changes_depth(trained, data_dir):
    base = evaluate(trained, data_dir, tasks="none", max_tokens=1024, progress=False)
    fewer = evaluate(trained, data_dir, tasks="none", max_tokens=1024, num_loops=1, progress=False)
    assert base["num_loops"] == 3 and fewer["num_loops"] == 1 and base["ppl"] != fewer["ppl"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "hellaswag,nope"], "unknown task(s) nope"),
        (["--tasks", "copa", "--offline"], "task copa:"),
        (["--tasks", "copa", "--limit", "0"], "--limit must be at least 1"),
    ],
)
def test_eval_bad_input_is_one_line(trained, tmp_path, capsys, args, message):
    empty = tmp_path / "no-tasks"
    empty.mkdir()
    assert cli(["eval", str(trained), "--tasks-dir", str(empty), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_eval_refuses_data_from_another_tokenizer(trained, texts, tmp_path, capsys):
    other = make_tokenizer(tmp_path / "other-tok", texts[::-1][:30])  # same size, other merges
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:6]))
    prepare([str(tmp_path / "d.jsonl")], str(other), str(tmp_path / "other"), val_fraction=0.5, workers=1, progress=False)
    assert cli(["eval", str(trained), "--data", str(tmp_path / "other"), "--tasks", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert "another tokenizer" in err and "\n" not in err


def test_resolve_tasks():
    assert [t.name for t in resolve_tasks("copa, piqa")[0]] == ["copa", "piqa"]
    assert resolve_tasks("none") == ([], True) and len(resolve_tasks("all")[0]) == len(TASKS)


# ------------------------------------------------------------------------------------------ int4
def test_int4_checkpoint_evaluates_through_load_model(tmp_path, tok_dir, data_dir):
    convert = pytest.importorskip("hyperloop.quant.convert")
    source = make_checkpoint(tmp_path / "float", tok_dir)
    convert.quantize_checkpoint(source, tmp_path / "int4", method="rtn", group_size=32, progress=False)
    floats = evaluate(source, data_dir, tasks="none", max_tokens=1024, progress=False)
    int4 = evaluate(tmp_path / "int4", data_dir, tasks="none", max_tokens=1024, progress=False)
    assert int4["tokens"] == floats["tokens"] and int4["ppl"] == pytest.approx(floats["ppl"], rel=0.05)
