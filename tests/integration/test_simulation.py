"""A real multi-round federation through the `fedlora` command: Hydra → Ray → Flower → MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY

pytestmark = pytest.mark.integration

SUMMARY_KEYS = {
    "strategy", "rounds_completed", "rounds_planned", "global_accuracy", "personalized_accuracy", "history",
    "epsilon_max", "epsilon_per_client", "delta", "bytes_up", "bytes_down", "wall_time_s", "mlflow",
}


def run_cli(*args: str, timeout: int = 600, env: dict | None = None, ok: bool = True) -> tuple[Path | None, str]:
    r = subprocess.run([sys.executable, "-m", "fedlora.cli", *args], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    if not ok:
        assert r.returncode != 0, r.stdout[-2000:]
        first = next((ln for ln in r.stdout.splitlines() if ln.startswith("run dir: ")), None)
        return (Path(first[len("run dir: "):]) if first else None), r.stdout + r.stderr
    assert r.returncode == 0, f"fedlora {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("run dir: "), r.stdout[-2000:]
    return Path(last[len("run dir: "):]), r.stdout


LS_AT_CRASH: list[dict] = []  # `fedlora ls` of the runs root between the kill and the resume


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """A DP federation whose coordinator is killed (SIGKILL) right after round 2's checkpoint, then continued with
    `fedlora resume`: every test below reads the resumed run."""
    root = tmp_path_factory.mktemp("runs")
    overrides = [o for o in TINY if not o.startswith(("tracking=", "rounds=", "privacy="))]
    run_dir, crash_out = run_cli("run", *overrides, "rounds=3", "tracking=mlflow", f"runs_root={root}",
                                 "strategy=ffa", "privacy=dp", "privacy.epsilon=50", "model.pooling=mean", ok=False,
                                 env={"FEDLORA_FAILPOINTS": "coordinator.checkpointed@2=kill"})
    assert run_dir is not None, crash_out[-3000:]
    import torch

    at_crash = torch.load(run_dir / "checkpoint.pt", weights_only=False)  # what the killed coordinator left
    stopped = _ls(root)
    resumed_dir, out = run_cli("resume", str(run_dir))
    assert resumed_dir == run_dir
    LS_AT_CRASH[:] = stopped
    return run_dir, out, json.loads((run_dir / "summary.json").read_text()), at_crash


def _ls(root: Path) -> list[dict]:
    r = subprocess.run([sys.executable, "-m", "fedlora.cli", "ls", "--runs-root", str(root), "--format", "json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_ls_and_show_report_status_progress_and_history(fed):
    run_dir, _, s, _ = fed
    [stopped] = LS_AT_CRASH
    assert stopped["run"] == str(run_dir) and stopped["status"] == "stopped"  # killed: resumable
    assert stopped["rounds_completed"] == 2 and stopped["rounds_planned"] == 3
    [row] = _ls(run_dir.parent)
    assert row["status"] == "finished" and row["rounds_completed"] == 3 and row["strategy"] == "ffa"
    assert row["accuracy"] == s["global_accuracy"] and row["epsilon_max"] == s["epsilon_max"]
    r = subprocess.run([sys.executable, "-m", "fedlora.cli", "show", str(run_dir), "--format", "json"],
                       capture_output=True, text=True, timeout=120)
    shown = json.loads(r.stdout)
    assert [h["round"] for h in shown["history"]] == [1, 2, 3] and shown["config"]["strategy"]["name"] == "ffa"
    r = subprocess.run([sys.executable, "-m", "fedlora.cli", "show", str(run_dir)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "finished" in r.stdout and "global_accuracy" in r.stdout
    r = subprocess.run([sys.executable, "-m", "fedlora.cli", "show", str(run_dir.parent)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "not a fedlora run directory" in r.stderr


def test_resume_continues_round_counter_global_state_and_ledgers(fed):
    import torch

    run_dir, out, s, at_crash = fed
    assert at_crash["round"] == 2
    assert [h["round"] for h in s["history"]] == [1, 2, 3] and s["rounds_completed"] == 3
    # rounds 1-2 are the checkpoint's, not run again
    assert s["history"][:2] == [{k: v for k, v in h.items() if k != "clients"} for h in at_crash["history"]]
    assert s["mlflow"]["run_id"] == at_crash["run_id"]
    # ledgers continue: every client that trained in round 3 has one more participation on top of its round-2 ε
    before, after = at_crash["ledgers"], s["privacy"]["ledgers"]
    assert set(before) <= set(after)
    for cid, led in after.items():
        assert led["steps"] % 3 == 0
        if cid in before:
            assert led["steps"] >= before[cid]["steps"] and led["epsilon"] >= before[cid]["epsilon"]
    grew = [c for c in after if after[c]["steps"] > before.get(c, {"steps": 0})["steps"]]
    assert len(grew) == s["history"][2]["reported"] == 2
    ck = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ck["round"] == 3 and ck["version"] == 3
    # each accepted client row: its training time and its whole handling of the message (data, training, state)
    # (a reply replayed after the crash keeps its stored client_s; round 1 ran once)
    rows = [c for h in ck["history"] for c in h["clients"].values()]
    assert rows and all(c["handler_s"] > 0 and c["client_s"] > 0 for c in rows)
    assert all(c["handler_s"] >= c["client_s"] for c in ck["history"][0]["clients"].values())


def test_summary_is_complete(fed):
    run_dir, out, s, _ = fed
    assert SUMMARY_KEYS <= set(s)
    assert s["strategy"] == "ffa" and s["rounds_completed"] == s["rounds_planned"] == 3
    assert len(s["history"]) == 3 and [h["round"] for h in s["history"]] == [1, 2, 3]
    assert s["global_accuracy"] == s["history"][-1]["global_accuracy"] is not None
    assert s["bytes_up"] > 0 and s["bytes_down"] > s["bytes_up"] / 2
    assert s["mlflow"]["run_id"] and s["mlflow"]["tracking_uri"].startswith("sqlite:///")
    assert all(h["reported"] == 2 and h["failed"] == h["rejected"] == 0 for h in s["history"])
    assert "round 3/3" in out and "global accuracy per round" in out and "fedlora ui" in out
    assert "round 1/3" not in out  # the resumed process ran round 3 only
    # the simulated clients were registered from Flower's node -> partition map (lifecycle.scalable_simulation),
    # not by a handshake message to each node
    # (the first process's log: Hydra's job log file; `fedlora resume` prints only the console's lines)
    log = (run_dir / "fedlora.log").read_text()
    assert "4 simulated clients registered from their partitions, without a message" in log
    # DP: every client that trained has a ledger; ε per client per round, the max never above the target
    eps = s["epsilon_per_client"]
    assert eps and all(0 < e <= 50 for e in eps.values()) and s["epsilon_max"] == max(eps.values())
    assert s["delta"] == pytest.approx(1e-5)
    latest: dict[str, float] = {}  # a round's record: ε of the clients that answered it; epsilon_max: of all so far
    for h in s["history"]:
        assert set(h["epsilon_per_client"]) <= set(h["sampled_clients"])
        latest.update(h["epsilon_per_client"])
        assert h["epsilon_max"] == max(latest.values())
    assert latest == eps
    assert [h["epsilon_max"] for h in s["history"]] == sorted(h["epsilon_max"] for h in s["history"])
    for cid, led in s["privacy"]["ledgers"].items():
        assert led["accountant"] == "prv" and led["steps"] % 3 == 0 and led["epsilon"] == eps[cid]


def test_mlflow_run_holds_round_metrics_and_adapter(fed):
    from mlflow.tracking import MlflowClient

    run_dir, _, s, _ = fed
    client = MlflowClient(tracking_uri=s["mlflow"]["tracking_uri"])
    run = client.get_run(s["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["strategy.name"] == "ffa" and run.data.params["clients.num"] == "4"
    for name in ("global/accuracy", "global/loss", "clients/sampled", "clients/reported", "clients/failed",
                 "clients/rejected", "bytes/up", "bytes/down", "time/round_s", "client_loss/mean"):
        hist = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in hist) == [1, 2, 3], name
    import pandas as pd

    table = client.download_artifacts(run.info.run_id, "clients.json", str(run_dir / "dl"))  # per-client series
    rows = pd.read_json(table, orient="split")
    for cid, e in s["epsilon_per_client"].items():
        assert rows[rows.client == cid].epsilon.max() == pytest.approx(e)
    assert sorted(set(rows["round"])) == [1, 2, 3]
    assert not any(k.startswith("client/") for k in run.data.metrics)  # no chart section per client
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on the training-runs view
    assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.name"] == "fedlora run"
    assert "strategy=ffa" in run.data.tags["fedlora.overrides"] and "strategy=ffa" in run.data.tags[
        "mlflow.note.content"]
    assert len(client.get_metric_history(run.info.run_id, "epsilon/max")) == 3
    acc = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "global/accuracy")}
    assert acc[3] == pytest.approx(s["global_accuracy"])
    assert "figures/rounds.png" in {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_config.json" in arts and "adapter/adapter_model.safetensors" in arts


def test_saved_adapter_reproduces_logged_accuracy(fed):
    """The PEFT artifact (of a mean-pooling head, the default's), loaded the standard way on the base model, scores
    what the run logged."""
    from peft import PeftModel

    from fedlora.lifecycle import load_run_config
    from fedlora.task.data import global_split, label_names, tokenize
    from fedlora.task.model import load_base_model, load_tokenizer
    from fedlora.task.train import evaluate

    run_dir, _, s, _ = fed
    cfg = load_run_config(run_dir)
    base = load_base_model(cfg.model, num_labels=len(label_names(cfg.data, cfg.seed)), seed=cfg.seed)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    _, test = global_split(cfg.data, cfg.seed)
    tok = load_tokenizer(cfg.model)
    out = evaluate(model, tokenize(list(test), tok, cfg.model.max_length), pad_id=tok.pad_token_id)
    assert out["accuracy"] == pytest.approx(s["global_accuracy"], abs=1e-9)
    assert out["loss"] == pytest.approx(s["history"][-1]["global_loss"], rel=1e-4)


def test_logged_mlflow_model_loads_and_reproduces_the_logged_accuracy(fed):
    """The run's MLflow model (pyfunc, signature, input example) loads with MLflow alone and scores what the run
    logged; the run records its datasets; the adapter names a portable base and carries a filled model card."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from fedlora.lifecycle import load_run_config
    from fedlora.task.data import global_split, label_names

    run_dir, _, s, _ = fed
    uri, run_id = s["mlflow"]["tracking_uri"], s["mlflow"]["run_id"]
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    assert model.metadata.get_input_schema().input_names() == ["text"]
    assert {"label", "score"} == set(model.metadata.get_output_schema().input_names())
    cfg = load_run_config(run_dir)
    names = label_names(cfg.data, cfg.seed)
    _, test = global_split(cfg.data, cfg.seed)
    import pandas as pd

    pred = model.predict(pd.DataFrame({"text": list(test["text"])}))
    acc = sum(p == names[y] for p, y in zip(pred["label"], test["label"])) / len(test)
    assert acc == pytest.approx(s["global_accuracy"], abs=1e-9)
    assert pred["score"].between(0.5 if len(names) == 2 else 0.0, 1.0).all()
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    contexts = {d.dataset.name: {t.value for t in d.tags if t.key == "mlflow.data.context"}
                for d in run.inputs.dataset_inputs}
    assert contexts == {"rt_polarity-test": {"test"}, "rt_polarity-train": {"train"}}
    assert "/site-packages/" not in (run_dir / "adapter" / "adapter_config.json").read_text()
    card = (run_dir / "adapter" / "README.md").read_text()
    assert "strategy `ffa`" in card and "3 of 3 rounds" in card and "δ = 1e-05" in card
    assert f"{s['global_accuracy']:.4f}" in card


def test_parallel_sweep_gives_one_mlflow_run_per_point_under_one_parent(tmp_path):
    """`fedlora run -m hydra/launcher=joblib`: Hydra multirun through Hydra's joblib launcher, the points at once
    (each its own process and Ray), each a full federation through Ray + Flower, grouped in MLflow."""
    from mlflow.tracking import MlflowClient

    overrides = [o for o in TINY if not o.startswith(("tracking=", "rounds="))]
    r = subprocess.run(
        [sys.executable, "-m", "fedlora.cli", "run", "-m", *overrides, "rounds=1", "tracking=mlflow",
         f"runs_root={tmp_path}", "strategy=ffa,fedsvd", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
        capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "Add type hints" not in r.stdout + r.stderr  # MLflow's type-hint notice, for a model with a signature
    logs, placements = sorted(tmp_path.glob("sweep-*/*/fedlora.log")), sorted(tmp_path.glob("sweep-*/*/placement.json"))
    assert len(logs) == len(placements) == 2
    for log in logs:  # each point's actors: its share of its 2-CPU Ray
        assert "1 client actor(s) for this federation (its share of the cluster's 2 with 2 federations at once)" \
            in log.read_text(), log
    for p in placements:
        assert sum(json.loads(p.read_text())["client_actor_nodes"].values()) == 1, p
    summaries = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("sweep-*/*/summary.json"))]
    assert sorted(s["strategy"] for s in summaries) == ["fedsvd", "ffa"]
    assert all(s["rounds_completed"] == 1 and s["global_accuracy"] is not None for s in summaries)
    client = MlflowClient(tracking_uri=summaries[0]["mlflow"]["tracking_uri"])
    parents = {client.get_run(s["mlflow"]["run_id"]).data.tags.get("mlflow.parentRunId") for s in summaries}
    assert len(parents) == 1 and None not in parents
    parent = client.get_run(parents.pop())
    assert parent.data.tags["fedlora.sweep_dir"].startswith(str(tmp_path))
    assert parent.info.status == "FINISHED"  # the multirun's end closes it, with a comparison across points
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "sweep_comparison.json" in arts
    children = [client.get_run(s["mlflow"]["run_id"]) for s in summaries]
    first, second = sorted(children, key=lambda c: c.info.start_time)
    assert second.info.start_time < first.info.end_time  # both federations were running at once
    assert sorted(c.info.run_name.split(" ", 1)[1].count("strategy=") for c in children) == [1, 1]  # named by point
    # no DP in these runs: no ε anywhere (never a 0.0 that nobody computed)
    assert all(s["epsilon_max"] is None and not s["epsilon_per_client"] for s in summaries)
    assert all("epsilon/max" not in c.data.metrics for c in children)
