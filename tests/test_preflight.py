"""Bad input found before any engine starts: exit 2, a message naming the key or the file, no run directory."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tests.conftest import TINY

pytestmark = pytest.mark.federation

BASE = [o for o in TINY if not o.startswith("data.")]
NL = b"\n"
LATIN1 = b"text,label" + NL + "café au lait,pos".encode("latin-1") + NL + b"tea,neg"
ONE_CLASS = b"text,label" + NL + b"".join(f"sentence {i},x".encode() + NL for i in range(300))


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _cases(tmp):
    ok_rows = "".join(f"sentence number {i} is here,{'pos' if i % 2 else 'neg'}\n" for i in range(400))
    return {
        "missing model folder": (["model.name_or_path=/nonexistent/model"], ["model.name_or_path", "/nonexistent"]),
        "hub id not cached offline": (["model.name_or_path=someone/unknown-model"],
                                      ["model.name_or_path", "offline"]),
        "missing data file": (["data=local", f"data.path={tmp / 'nope.csv'}"], ["data.path", "no such file"]),
        "empty data file": (["data=local", f"data.path={_write(tmp / 'empty.csv', b'')}"], ["data.path", "empty"]),
        "header only": (["data=local", f"data.path={_write(tmp / 'header.csv', b'text,label')}"],
                        ["data.path", "no records"]),
        "not utf-8": (["data=local", f"data.path={_write(tmp / 'latin.csv', LATIN1)}"], ["data.path", "UTF-8"]),
        "one row": (["data=local", f"data.path={_write(tmp / 'one.csv', b'text,label' + NL + b'hello,pos')}"],
                    ["data.label_column", "1 class"]),
        "one class": (["data=local", "data.partitioner=iid", f"data.path={_write(tmp / 'oneclass.csv', ONE_CLASS)}"],
                      ["data.label_column", "1 class"]),
        "missing column": (["data=local", "data.text_column=sentence",
                            f"data.path={_write(tmp / 'ok.csv', b'text,label' + NL + ok_rows.encode())}"],
                           ["data.text_column", "sentence", "text"]),
        "infeasible dirichlet": (["data.max_examples=600", "clients.num=1000", "clients.per_round=2"],
                                 ["data.alpha", "clients.num=1000"]),
        "batch larger than the data, no DP": (["data.max_examples=600", "clients.batch_size=5000",
                                               "clients.sample_rate=null"],
                                              ["clients.batch_size", "smallest client"]),
        "unreachable ray cluster": (["data.max_examples=600", "runtime=ray_cluster", "runtime.address=127.0.0.1:1"],
                                    ["runtime.address", "127.0.0.1:1"]),
    }


@pytest.mark.parametrize("case", ["missing model folder", "hub id not cached offline", "missing data file",
                                  "empty data file", "header only", "not utf-8", "one row", "one class",
                                  "missing column", "infeasible dirichlet", "batch larger than the data, no DP",
                                  "unreachable ray cluster"])
def test_bad_input_exits_2_naming_it_before_any_engine(tmp_path, case):
    data = tmp_path / "data"
    data.mkdir()
    overrides, words = _cases(data)[case]
    runs = tmp_path / "runs"
    r = subprocess.run([sys.executable, "-m", "fedlora.cli", "run", *BASE, *overrides, f"runs_root={runs}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, (case, r.stdout[-1500:], r.stderr[-2500:])
    assert all(w in r.stderr for w in words), (case, r.stderr[-2500:])
    assert "Traceback" not in r.stderr, r.stderr[-2500:]
    assert not runs.exists() or not any(runs.iterdir()), list(runs.rglob("*"))


def test_resume_names_a_corrupt_checkpoint_before_ray(tmp_path):
    import json

    from fedlora.config import compose

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(compose([*TINY, f"runs_root={tmp_path}"])))
    (run / "checkpoint.pt").write_bytes(b"\x80\x02garbage")
    r = subprocess.run([sys.executable, "-m", "fedlora.cli", "resume", str(run)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and str(run / "checkpoint.pt") in r.stderr and "unreadable" in r.stderr, r.stderr[-2000:]


def test_ui_refuses_a_busy_port(tmp_path):
    (tmp_path / "mlflow.db").write_bytes(b"")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "fedlora.cli", "ui", "--runs-root", str(tmp_path), "--port",
                            str(port)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"port {port}" in r.stderr and "in use" in r.stderr, r.stderr[-2000:]
