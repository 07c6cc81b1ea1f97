"""HF export (issue 6): AutoModelForCausalLM loads an export with the native logits (fp32, 1e-5) for
all four architectures, padded batches and generate() work, the test-time loop count is a config
override, the tokenizer encodes exactly as ours, int4 checkpoints export, `lm_eval --model hf`
on an export agrees with our runner, and bad input fails in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_eval
import torch
from test_eval import (
    ARCHS,
    DOCS,
    assert_lm_eval_agrees,
    lm_eval_task_configs,
    make_checkpoint,
    real_tasks_where_present,
    write_tasks,
)

from hyperloop.checkpoint import load_model
from hyperloop.cli import main as cli
from hyperloop.data.demo import demo_tokenizer_path
from hyperloop.data.tokenizer import load_tokenizer
from hyperloop.hf.export import export_hf

transformers = pytest.importorskip("transformers")
texts, tok_dir = test_eval.texts, test_eval.tok_dir  # the same fixtures: demo texts and a 512-token BPE


def load_hf(folder: Path, **overrides):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32,
                                                             **overrides).eval()  # fmt: skip


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tok_dir) -> dict[str, tuple[Path, Path]]:
    """arch -> (native checkpoint, HF export) of a random-weight tiny model."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for arch in ARCHS:
        ckpt = make_checkpoint(root / f"{arch}-ckpt", tok_dir, arch)
        out[arch] = (ckpt, export_hf(ckpt, root / f"{arch}-hf"))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_exported_logits_and_loss_equal_native(exported, arch):
    ckpt, folder = exported[arch]
    native, hf = load_model(ckpt).model, load_hf(folder)
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = native(tokens), hf(tokens)
        assert torch.allclose(got.logits, want, atol=1e-5, rtol=0)
        labelled = hf(tokens, labels=tokens).loss
        assert labelled.item() == pytest.approx(native(tokens[:, :-1], tokens[:, 1:]).item(), abs=1e-5)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hyperloop.HyperloopForCausalLM"
    assert {"configuration_hyperloop.py", "modeling_hyperloop.py", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()
    }


def test_padded_batch_and_generate_match_single_prompts(exported):
    ckpt, folder = exported["hyperloop"]
    hf, native = load_hf(folder), load_model(ckpt).model
    tok = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    prompts = ["The river flows", "A much longer prompt about the history of the town"]
    batch = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        logits = hf(**batch).logits
        for row, prompt in enumerate(prompts):
            alone = hf(**tok([prompt], return_tensors="pt")).logits[0]
            assert torch.allclose(logits[row, -alone.shape[0] :], alone, atol=1e-5)
        generated = hf.generate(**batch, max_new_tokens=6, do_sample=False)
    for row, prompt in enumerate(prompts):
        ids = tok([prompt])["input_ids"][0]
        greedy = list(ids)
        with torch.no_grad():
            for _ in range(6):  # greedy decoding by full native forwards
                greedy.append(int(native(torch.tensor([greedy]))[0, -1].argmax()))
        assert generated[row, -6:].tolist() == greedy[-6:]


def test_loop_count_is_a_load_time_override(exported):
    ckpt, folder = exported["hyperloop"]
    hf, native = load_hf(folder, num_loops=2), load_model(ckpt).model
    tokens = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(1))
    assert hf.config.num_loops == 2
    with torch.no_grad():
        assert torch.allclose(hf(tokens).logits, native(tokens, num_loops=2), atol=1e-5)
        assert not torch.allclose(hf(tokens).logits, native(tokens), atol=1e-3)


def test_llama2_tokenizer_exports_exactly(tmp_path):
    llama2 = tmp_path / "llama2"
    load_tokenizer(demo_tokenizer_path()).save(llama2)
    ckpt = make_checkpoint(tmp_path / "ckpt", llama2, "transformer", vocab_size=32000)
    folder = export_hf(ckpt, tmp_path / "hf")
    ours, theirs = load_tokenizer(llama2), transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    strings = [value for doc, _, _ in DOCS.values() for value in doc.values() if isinstance(value, str)]
    strings += [ctx + cont for _, requests, _ in DOCS.values() for ctx, cont in requests]
    strings += ["  two leading", "tab\tand\nnewline  double", "naïve café 漢字 🙂", "<s> literal", ""]
    for text in strings:
        assert theirs(text)["input_ids"] == [ours.bos_id] + ours.encode(text), text
        assert theirs.decode(theirs(text)["input_ids"], skip_special_tokens=True) == ours.decode(ours.encode(text))


def test_int4_checkpoint_exports_its_dequantized_weights(tmp_path, tok_dir):
    convert = pytest.importorskip("hyperloop.quant.convert")
    source = make_checkpoint(tmp_path / "float", tok_dir)
    convert.quantize_checkpoint(source, tmp_path / "int4", method="rtn", group_size=32, progress=False)
    folder = export_hf(tmp_path / "int4", tmp_path / "hf")
    native = load_model(tmp_path / "int4", dtype=torch.float32).model
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(load_hf(folder)(tokens).logits, native(tokens), atol=1e-5)


def test_lm_eval_hf_on_an_export_agrees_with_our_runner(tmp_path, tok_dir, texts, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")  # lm-eval's HF model needs it (the lm-eval[hf] extra)
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = make_checkpoint(tmp_path / "ckpt", tok_dir, train_texts=texts, steps=25)
    folder = export_hf(ckpt, tmp_path / "hf")
    source, limit = real_tasks_where_present(tmp_path / "tasks", write_tasks(tmp_path / "inline")), 3
    (tmp_path / "yaml").mkdir()
    found = lm_eval_task_configs(tmp_path / "yaml", source)
    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},trust_remote_code=True,dtype=float32",
                                      tasks=[f"local_{n}" for n in found], device="cpu", batch_size=8, limit=limit,
                                      task_manager=TaskManager(include_path=str(tmp_path / "yaml")), log_samples=True)  # fmt: skip
    assert_lm_eval_agrees(results, load_model(ckpt), source, found, limit, abs_ll=2e-4)


def test_export_bad_input_is_one_line(exported, tmp_path, capsys):
    ckpt, folder = exported["looped"]
    assert cli(["export-hf", str(ckpt), "--out", str(folder)]) == 2  # exists, no --overwrite
    assert cli(["export-hf", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    bare = make_checkpoint(tmp_path / "bare", tmp_path / "no-tokenizer")
    assert cli(["export-hf", str(bare), "--out", str(tmp_path / "y")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3
    assert "already exists" in errors[0] and "not found" in errors[1] and "no tokenizer" in errors[2]
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".y.partial-*"))
