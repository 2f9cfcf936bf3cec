"""The `fedlora` command: every config error exits 2 before any work (no directory), run directories are never
reused, and a resume keeps the run's privacy settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.federation


def fedlora(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedlora.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_refuses_bad_override_before_any_work(tmp_path):
    """The real command: exits 2 with the key named, and starts nothing (no run directory at all)."""
    for bad, words in (("clients.per_round=50", ("clients.per_round", "clients.num")),
                       ("strategy=bogus", ("strategy/bogus", "fedsvd")),
                       ("roundz=3", ("roundz",))):
        r = fedlora("run", bad, f"runs_root={tmp_path}")
        assert r.returncode == 2, (bad, r.stderr[-2000:])
        assert all(w in r.stderr for w in words), (bad, r.stderr[-2000:])
        assert not tmp_path.exists() or not any(tmp_path.iterdir()), (bad, list(tmp_path.rglob("*")))


def test_cli_refuses_a_bad_sweep_point_before_any_work(tmp_path):
    r = fedlora("run", "-m", "rounds=2,0", f"runs_root={tmp_path}")
    assert r.returncode == 2 and "rounds" in r.stderr, r.stderr[-2000:]
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_cli_help_lists_groups_and_every_key_with_its_value_and_doc():
    r = fedlora("run", "--help", "privacy=none", "clients.gpus=0.5")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(ln.split() == ["privacy", "dp,", "none*"] for ln in lines)  # the selected option is starred
    assert any(ln.split()[:2] == ["strategy", "fedavg,"] and "fedsvd*," in ln for ln in lines)
    gpus = next(ln for ln in lines if ln.strip().startswith("clients.gpus = "))
    assert "clients.gpus = 0.5" in gpus and "GPUs per simulated client actor" in gpus  # value under the overrides
    from fedlora.config import config_keys

    for key in config_keys():  # every key of every group, each with its doc
        line = next((ln for ln in lines if ln.strip().startswith(f"{key} = ")), None)
        assert line is not None and len(line.split("  ")[-1].strip()) > 3, key
    bad = fedlora("run", "--help", "nosuch=1")
    assert bad.returncode == 2 and "nosuch" in bad.stderr




def _finished_looking_run(tmp_path):
    from fedlora.config import compose

    run = tmp_path / "old-run"
    run.mkdir()
    stored = compose(["privacy=dp", "model=tiny_bert", f"runs_root={tmp_path}"])
    (run / "config.json").write_text(json.dumps(stored))
    (run / "fedlora-run.json").write_text("{}")
    return run, stored


def test_run_into_an_existing_run_directory_is_refused_and_the_directory_untouched(tmp_path):
    run, _ = _finished_looking_run(tmp_path)
    before = sorted(p.name for p in run.rglob("*"))
    r = fedlora("run", f"hydra.run.dir={run}", "privacy=none", "seed=5", "rounds=8", f"runs_root={tmp_path}")
    assert r.returncode == 2 and "already holds a fedlora run" in r.stderr and "fedlora resume" in r.stderr
    assert sorted(p.name for p in run.rglob("*")) == before  # not even Hydra's .hydra/ was written into it


def test_two_launches_never_share_a_run_directory(tmp_path):
    from fedlora.lifecycle import claim_run_dir
    from fedlora.schema import ConfigError

    claim_run_dir(tmp_path / "r")
    with pytest.raises(ConfigError, match="already holds a fedlora run"):
        claim_run_dir(tmp_path / "r")


@pytest.mark.parametrize("override, key", [("privacy.epsilon=50", "privacy.epsilon"), ("privacy=none", "privacy"),
                                           ("strategy.lr=1.0", "strategy.lr"), ("seed=5", "seed")])
def test_resume_refuses_to_change_anything_but_resumable_keys(tmp_path, override, key):
    run, stored = _finished_looking_run(tmp_path)
    r = fedlora("resume", str(run), override)
    assert r.returncode == 2, r.stderr[-2000:]
    assert key in r.stderr and "cannot change on resume" in r.stderr
    assert json.loads((run / "config.json").read_text()) == stored


def test_a_checkpoint_refuses_a_config_that_differs_from_its_own(tmp_path):
    """Even an edited config.json cannot continue a checkpoint under other privacy settings."""
    from fedlora.coordinator.core import check_resumable
    from fedlora.schema import ConfigError
    from tests.conftest import config

    stored = config("privacy=dp").to_dict()
    check_resumable(stored, config("privacy=dp", "rounds=20").to_dict(), tmp_path)  # rounds may change
    with pytest.raises(ConfigError) as e:
        check_resumable(stored, config("privacy=dp", "privacy.epsilon=80").to_dict(), tmp_path)
    assert e.value.key == "privacy.epsilon"


def test_version_help_and_an_unknown_command():
    cli = fedlora
    v = cli("--version")
    assert v.returncode == 0 and v.stdout.strip().startswith("fedlora ") and v.stdout.split()[1][0].isdigit()
    h = cli("--help")
    assert h.returncode == 0 and "usage: fedlora <command>" in h.stdout and "fedlora serve" in h.stdout
    bad = cli("rn")
    assert bad.returncode == 2 and "unknown command 'rn'" in bad.stderr and "did you mean 'run'" in bad.stderr
    assert cli().returncode == 2


def test_bash_completion_completes_commands_groups_options_and_keys():
    import os

    script = (
        'eval "$(fedlora completion bash)"\n'
        't() { COMP_LINE="$1"; COMP_POINT=${#COMP_LINE}; COMPREPLY=(); _fedlora; echo "${COMPREPLY[*]}"; }\n'
        't "fedlora r"; t "fedlora run strategy=f"; t "fedlora run clients.gp"; t "fedlora run privacy=none model=t"\n'
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["run resume", "fedavg fedsa fedsvd ffa", "clients.gpus=", "tiny_bert"], r.stderr
