"""Bad input: a one-line error naming the culprit, a non-zero exit, and nothing committed."""

import shutil
import subprocess
import sys

import pytest
import yaml

from fusion.cli import main
from fusion.errors import BAD_INPUT_EXIT_CODE


def run_cli(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    return code, err


def committed_files(store):
    return sorted(p for p in store.rglob("*") if p.is_file()) if store.exists() else []


def write(tmp_path, spec):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def store(tmp_path):
    return tmp_path / "store"


def expect_error(capsys, spec_path, store, *needles):
    code, err = run_cli(capsys, "run", str(spec_path), "--store", str(store))
    assert code == BAD_INPUT_EXIT_CODE
    assert err.startswith("fusion: error:") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    assert committed_files(store) == []


def test_malformed_yaml(tmp_path, store, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text("name: micro\nmodels: {target: [\n")
    expect_error(capsys, path, store, "spec.yaml", "malformed YAML")


def test_unknown_key(tmp_path, store, micro, capsys):
    spec = micro.spec(store)
    spec["train"]["learning_rate"] = 1e-3
    expect_error(capsys, write(tmp_path, spec), store, "unknown key 'train.learning_rate'")


def test_mistyped_value(tmp_path, store, micro, capsys):
    spec = micro.spec(store)
    spec["logits"]["top_k"] = "ten"
    expect_error(capsys, write(tmp_path, spec), store, "key 'logits.top_k'")


def test_missing_model_path(tmp_path, store, micro, capsys):
    spec = micro.spec(store)
    spec["models"]["sources"][1]["path"] = str(tmp_path / "no-such-model")
    expect_error(capsys, write(tmp_path, spec), store, "model 'src-neox'", "no-such-model")


def test_empty_corpus(tmp_path, store, micro, capsys):
    corpus = tmp_path / "empty.jsonl"
    corpus.write_text('{"text": "   "}\n\n')
    expect_error(capsys, write(tmp_path, micro.spec(store, **{"corpus.path": str(corpus)})), store, "empty corpus")


def test_a_corpus_whose_only_document_is_held_out_says_so(tmp_path, store, micro, capsys):
    corpus = tmp_path / "one.jsonl"
    corpus.write_text('{"text": "One document is all there is."}\n')  # document 0 is held out at fractions > 0.055
    spec = micro.spec(store, **{"corpus.path": str(corpus), "corpus.heldout_fraction": 0.2})
    expect_error(capsys, write(tmp_path, spec), store, "all 1 document(s) with text went to held-out evaluation",
                 "corpus.heldout_fraction=0.2", "lower corpus.heldout_fraction")
    code, err = run_cli(capsys, "run", str(write(tmp_path, spec)), "--store", str(store))
    assert "empty corpus" not in err


def test_a_corpus_with_nothing_held_out_is_refused_before_training(tmp_path, store, micro, capsys):
    """One document at the default fraction goes to training: refused at prepare, not at eval."""
    corpus = tmp_path / "one.jsonl"
    corpus.write_text('{"text": "One document is all there is."}\n')  # document 0 trains at fractions < 0.055
    spec = micro.spec(store, **{"corpus.path": str(corpus)})
    del spec["corpus"]["heldout_fraction"]  # the default, 0.05
    expect_error(capsys, write(tmp_path, spec), store, "one.jsonl", "no document went to held-out evaluation",
                 "1 document(s)", "corpus.heldout_fraction=0.05", "raise corpus.heldout_fraction")


def test_a_tokenizer_path_that_is_a_file_names_its_folder(tmp_path, store, micro, capsys):
    spec = micro.spec(store)
    tokenizer_file = micro.models["src-neox"] / "tokenizer.json"
    spec["models"]["sources"][1]["tokenizer"] = str(tokenizer_file)
    expect_error(capsys, write(tmp_path, spec), store, "model 'src-neox'", "is a file", str(micro.models["src-neox"]))
    code, err = run_cli(capsys, "run", str(write(tmp_path, spec)), "--store", str(store))
    assert "does not exist" not in err


def test_a_model_path_that_is_a_file_says_so(tmp_path, store, micro, capsys):
    spec = micro.spec(store)
    spec["models"]["target"]["path"] = str(micro.models["target"] / "config.json")
    expect_error(capsys, write(tmp_path, spec), store, "model 'target'", "is a file", "folder")


def test_a_mistyped_set_key_names_the_option(tmp_path, store, micro, capsys):
    code, err = run_cli(capsys, "run", str(write(tmp_path, micro.spec(store))), "--store", str(store), "--set", "train.lrr=1")
    assert code == BAD_INPUT_EXIT_CODE
    assert err == "fusion: error: --set train.lrr=1: unknown key 'train.lrr'"
    assert committed_files(store) == []


def test_non_utf8_text(tmp_path, store, micro, capsys):
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes("café au lait\n".encode("latin-1"))
    expect_error(capsys, write(tmp_path, micro.spec(store, **{"corpus.path": str(corpus)})), store, "latin1.txt", "not UTF-8")


def test_tokenizer_larger_than_logits(tmp_path, store, micro, capsys):
    mixed = tmp_path / "mixed"
    shutil.copytree(micro.models["src-neox"], mixed)  # 500-token model ...
    for f in micro.models["target"].glob("tokenizer*"):  # ... with a 600-token tokenizer
        shutil.copy(f, mixed / f.name)
    spec = micro.spec(store)
    spec["models"]["sources"][1]["path"] = str(mixed)
    expect_error(capsys, write(tmp_path, spec), store, "model 'src-neox'", "logits")


def test_real_process_exit_code(tmp_path, store):
    path = tmp_path / "spec.yaml"
    path.write_text("name: [\n")
    proc = subprocess.run([sys.executable, "-m", "fusion", "run", str(path)], capture_output=True, text=True)
    assert proc.returncode == BAD_INPUT_EXIT_CODE
    assert proc.stderr.strip().count("\n") == 0 and "malformed YAML" in proc.stderr


def test_a_block_its_tokens_do_not_spell_names_the_align_shard(tmp_path, store, micro, monkeypatch, capsys):
    """Logits computed on one text, aligned against another: one line naming the shard, the
    source and the target, and no aligned shard committed."""
    from fusion.stages import split

    spec = micro.spec(store, **{"corpus.max_documents": 6, "split.shard_blocks": 400})  # one shard
    spec["models"]["sources"] = spec["models"]["sources"][:1]
    path = write(tmp_path, spec)
    code, err = run_cli(capsys, "run", str(path), "--stages", "split,vocab,logits")
    assert code == 0, err
    read_blocks = split.read_blocks

    def changed_under_the_logits(run, part, index):
        texts, arrays = read_blocks(run, part, index)
        return ["#" + texts[0], *texts[1:]], arrays

    monkeypatch.setattr(split, "read_blocks", changed_under_the_logits)
    code, err = run_cli(capsys, "stage", "align", str(path), "--shard", "0")
    assert code == BAD_INPUT_EXIT_CODE
    assert err.startswith("fusion: error: align shard 0, source 'src-llama', target 'target': ") and "\n" not in err, err
    assert "do not spell" in err, err
    assert not list((store / "align").rglob("shard-*.json"))
