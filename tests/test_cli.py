"""The command line: classify (good files answered, bad files named), info, python -m rmt_fast."""
import json
import subprocess
import sys

import pytest
import torch

from helpers import WORDS, save_model_with_vocab
from rmt_fast import Engine
from rmt_fast.cli import build_parser, main
from rmt_fast.tokenize import load_tokenizer



@pytest.fixture
def model_dir(tmp_path):
    return save_model_with_vocab(tmp_path / "model")


def test_classify_reports_bad_files_and_keeps_good_results(model_dir, tmp_path, capsys):
    model, d = model_dir
    good = tmp_path / "good.txt"
    good.write_text(" ".join(WORDS * 40), encoding="utf-8")
    good2 = tmp_path / "good2.txt"
    good2.write_bytes("\ufeffthe dog ran far away .".encode("utf-8"))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("the caf\xe9 cat".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    missing = tmp_path / "missing.txt"
    code = main(["classify", "--model", str(d), "--input", str(good), str(latin1), str(empty), str(missing),
                 str(good2), "--json", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 1
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["input"] for r in rows] == [str(good), str(good2)]
    assert "latin1.txt: not valid UTF-8 at byte 7" in err
    assert "empty.txt: no tokens left" in err and "missing.txt" in err
    # the fix is said as the flag a command-line user types, not the Engine's keyword argument
    assert "pass --decode-errors replace" in err and "pass --empty special" in err
    assert "errors='replace'" not in err and "empty='special'" not in err
    tokenizer = load_tokenizer(d)
    want = torch.softmax(Engine(model).classify_texts([good.read_text(), "the dog ran far away ."], tokenizer), -1)
    for r, p in zip(rows, want):
        assert r["label"] == "abcdef"[int(p.argmax())]
        assert list(r["probabilities"].values()) == pytest.approx(p.tolist(), abs=1e-5)


def test_classify_replace_decoding_and_empty_special(model_dir, tmp_path, capsys):
    _, d = model_dir
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("the caf\xe9 cat".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code = main(["classify", "--model", str(d), "--input", str(latin1), str(empty), "--decode-errors", "replace",
                 "--empty", "special", "--no-progress"])
    out, _ = capsys.readouterr()
    assert code == 0 and len(out.splitlines()) == 2


def test_classify_missing_device_is_a_clear_error(model_dir, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    _, d = model_dir
    f = tmp_path / "t.txt"
    f.write_text("the cat")
    assert main(["classify", "--model", str(d), "--input", str(f), "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_python_dash_m_info():
    res = subprocess.run([sys.executable, "-m", "rmt_fast", "info"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "torch" in res.stdout and "attention cpu/float32" in res.stdout


def test_demo_on_the_shipped_model(capsys):
    assert main(["demo", "--tokens", "3000", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "hidden fact(s):" in out and "truth:" in out and "segments/s" in out


# -- numeric flags: refused at parse time, naming the flag -------------------------------------------

@pytest.mark.parametrize("argv, flag", [
    (["evaluate", "--samples", "-3"], "--samples"),
    (["evaluate", "--samples", "0"], "--samples"),
    (["evaluate", "--lengths", "1,0"], "--lengths"),
    (["evaluate", "--threads", "0"], "--threads"),
    (["evaluate", "--long-samples", "x"], "--long-samples"),
    (["demo", "--tokens", "-5"], "--tokens"),
    (["bench", "--layers", "0"], "--layers"),
    (["bench", "--layers", "-2"], "--layers"),
    (["bench", "--segments", "1,-16"], "--segments"),
    (["bench", "--batch-size", "0"], "--batch-size"),
    (["flops", "--lengths", "512,-1"], "--lengths"),
    (["flops", "--num-mem-tokens", "-1"], "--num-mem-tokens"),
    (["train", "out", "--lr", "nan"], "--lr"),
    (["train", "out", "--lr", "0"], "--lr"),
    (["train", "out", "--dropout", "1.5"], "--dropout"),
    (["train", "out", "--stage-steps", "0"], "--stage-steps"),
    (["train", "out", "--bptt-depth", "-2"], "--bptt-depth"),
    (["train", "out", "--task", "memorise"], "--task"),
    (["attention-maps", "--model", "m", "--out", "o", "--task-segments", "0"], "--task-segments"),
    (["demo", "--dtype", "bf17"], "--dtype"),
    (["demo", "--device", "gpu"], "--device"),
    (["read", "--input", "x", "--state", "s", "--dtype", "float64"], "--dtype"),
    (["read", "--input", "x", "--state", "s", "--device", "cuda:x"], "--device"),
    (["ask", "--state", "s", "--device", "cpu:0"], "--device"),
    (["bench", "--dtype", "int4"], "--dtype"),
])
def test_flags_are_checked_at_parse_time(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)  # parsing only: a bad value must never reach a run
    assert e.value.code == 2
    assert f"argument {flag}: must be" in capsys.readouterr().err


# -- output folders: checked before any compute ----------------------------------------------------

def _no_compute(monkeypatch):
    """Make every command's compute fail loudly, so a test sees that it was never reached."""
    def boom(*a, **k):
        raise AssertionError("computed before checking --out")
    import rmt_fast.analysis.attention_maps_cli as amc
    import rmt_fast.analysis.flops as flops
    import rmt_fast.bench as bench
    import rmt_fast.evaluate as evaluate
    import rmt_fast.train as train
    from rmt_fast.model import RMTForSequenceClassification
    for mod, name in ((evaluate, "evaluate_model"), (bench, "builtin_model"), (flops, "scaling_table"),
                      (amc, "attention_maps"), (train, "build_model")):
        monkeypatch.setattr(mod, name, boom)
    monkeypatch.setattr(RMTForSequenceClassification, "from_pretrained", classmethod(boom))
    monkeypatch.setattr(RMTForSequenceClassification, "load", classmethod(boom))


@pytest.mark.parametrize("command", [["evaluate", "--no-progress"], ["bench"], ["flops"],
                                     ["attention-maps", "--model", "m"]])
@pytest.mark.parametrize("bad", ["file", "/proc/rmt-fast-x"])
def test_bad_out_fails_before_compute(command, bad, tmp_path, monkeypatch, capsys):
    _no_compute(monkeypatch)
    out = tmp_path / "a-file" if bad == "file" else bad
    (tmp_path / "a-file").write_text("keep me")
    assert main(command + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out}:") and err.count("\n") == 1
    assert (tmp_path / "a-file").read_text() == "keep me"


def test_train_out_dir_that_is_a_file_or_holds_other_files(tmp_path, monkeypatch, capsys):
    _no_compute(monkeypatch)
    (tmp_path / "a-file").write_text("x")
    assert main(["train", str(tmp_path / "a-file"), "--no-progress"]) == 2
    assert "OUT_DIR" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert main(["train", str(tmp_path / "full"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'full'} is not empty: pass --resume to continue it\n"


def test_errors_of_flops_and_attention_maps_go_to_stderr(tmp_path, capsys):
    assert main(["flops", "--models", "nope", "--no-plot"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and "nope" in err
    assert main(["attention-maps", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and "none" in err


# -- files that cannot be loaded: one line naming the file, status 2 -------------------------------

def _one_error_line(capsys, *needles):
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for n in needles:
        assert n in err, err
    assert "Traceback" not in err and "weights_only=False" not in err
    return err


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_safetensors_is_named(model_dir, tmp_path, damage, capsys):
    _, d = model_dir
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncated": data[:len(data) // 2], "garbage": b"\x07" * 300, "empty": b""}[damage])
    doc = tmp_path / "t.txt"
    doc.write_text("the cat sat")
    assert main(["classify", "--model", str(d), "--input", str(doc), "--no-progress"]) == 2
    _one_error_line(capsys, f"{f}: truncated or not a safetensors file")
    assert main(["demo", "--model", str(d), "--tokens", "10"]) == 2
    _one_error_line(capsys, f"{f}: truncated or not a safetensors file")
    assert main(["evaluate", str(d), "--out", str(tmp_path / "ev"), "--no-progress"]) == 2
    _one_error_line(capsys, f"{f}: truncated or not a safetensors file")


@pytest.mark.parametrize("content, problem", [
    ("[1, 2]", "expected a JSON object, found a list"),
    ("{\"format\": ", "not valid JSON"),
    ("\xff\xfe", "not valid JSON"),
])
def test_bad_config_json_is_named(model_dir, tmp_path, content, problem, capsys):
    _, d = model_dir
    (d / "config.json").write_bytes(content.encode("latin-1"))
    doc = tmp_path / "t.txt"
    doc.write_text("the cat")
    assert main(["classify", "--model", str(d), "--input", str(doc), "--no-progress"]) == 2
    _one_error_line(capsys, f"{d / 'config.json'}: {problem}")


def test_config_json_without_model_type(model_dir, tmp_path, capsys):
    _, d = model_dir
    meta = json.loads((d / "config.json").read_text())
    del meta["backbone"]["model_type"]
    (d / "config.json").write_text(json.dumps(meta))
    doc = tmp_path / "t.txt"
    doc.write_text("the cat")
    assert main(["classify", "--model", str(d), "--input", str(doc), "--no-progress"]) == 2
    _one_error_line(capsys, str(d / "config.json"), "no 'model_type'")


def test_reference_checkpoint_problems_are_named(tmp_path, capsys):
    from test_checkpoints import backbone_config, write_reference_checkpoint

    cfg = tmp_path / "config.json"
    backbone_config().to_json_file(str(cfg))
    doc = tmp_path / "t.txt"
    doc.write_text("the cat")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[CLS]", "[SEP]", "[UNK]"] + [f"w{i}" for i in range(56)]) + "\n")

    def classify(model, backbone=cfg):
        return main(["classify", "--model", str(model), "--backbone-config", str(backbone), "--tokenizer",
                     str(vocab), "--input", str(doc), "--no-progress"])

    random_pth = tmp_path / "random.pth"
    random_pth.write_bytes(bytes(range(256)) * 8)
    assert classify(random_pth) == 2
    _one_error_line(capsys, f"{random_pth}: not a checkpoint that can be loaded safely")
    import argparse
    evil = tmp_path / "evil.pth"
    torch.save({"model_state_dict": {}, "obj": argparse.Namespace(x=1)}, evil)
    assert classify(evil) == 2
    _one_error_line(capsys, f"{evil}: not a checkpoint that can be loaded safely", "Python objects")

    good = tmp_path / "model_best.pth"
    write_reference_checkpoint(good)
    ckpt = torch.load(good, weights_only=True)
    for key, value, problem in (("cls_token", None, "'cls_token' must be a non-empty 1-D integer tensor, found missing"),
                                ("mem_token_ids", torch.zeros(0, dtype=torch.int64), "'mem_token_ids' must be a non-empty")):
        broken = {k: v for k, v in ckpt["model_state_dict"].items() if k != key}
        if value is not None:
            broken[key] = value
        path = tmp_path / f"no-{key}.pth"
        torch.save({"model_state_dict": broken}, path)
        assert classify(path) == 2
        _one_error_line(capsys, f"{path}: {problem}")
    for content, problem in (("[]", "expected a JSON object"), ("{\"hidden_size\": 4}", "no 'model_type'"),
                             ("{oops", "not valid JSON")):
        cfg.write_text(content)
        assert classify(good) == 2
        _one_error_line(capsys, f"{cfg}", problem)


def test_closed_pipe_exits_quietly():
    """`rmt-fast flops | head -1`: the reader goes away; no traceback, the status of a SIGPIPE death."""
    p = subprocess.Popen([sys.executable, "-m", "rmt_fast", "flops", "--models", "all"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # the reader has gone before the first line is written
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and err == ""


def test_dtype_flag_takes_what_the_engine_takes():
    from rmt_fast.cli_args import DTYPE_NAMES, device_name, dtype_name
    from rmt_fast.engine.device_policy import DTYPES
    assert set(DTYPE_NAMES) == set(DTYPES) | {"auto"}          # one list, checked against the Engine's
    assert [dtype_name(x) for x in ("BF16", "auto")] == ["bf16", "auto"]
    assert [device_name(x) for x in ("cpu", "cuda", "cuda:1")] == ["cpu", "cuda", "cuda:1"]


def test_read_defaults_to_the_shipped_model():
    from rmt_fast.cli_args import default_model_dir
    args = build_parser().parse_args(["read", "--input", "x", "--state", "s"])
    assert args.model == str(default_model_dir()) and (default_model_dir() / "config.json").is_file()
