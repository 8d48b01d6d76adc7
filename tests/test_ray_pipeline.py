"""The Ray pipeline on a real local Ray cluster: rollout actors, DeepSpeed learners, broadcast.

Tiny random targets (SmolLM2's tokenizer), a few steps each. Real Ray, real DeepSpeed engines
over gloo, real broadcasts; the only fakes are injected faults (a killed actor, a corrupted
receive), which the driver must notice.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

ray = pytest.importorskip("ray")
pytest.importorskip("deepspeed")

from speculative.broadcast import BroadcastFailed, BroadcastMismatch  # noqa: E402
from speculative.config import load_config  # noqa: E402
from learners.learner_group import LearnerDied  # noqa: E402
from pipeline.driver import BREAKDOWN, Faults, run_distributed  # noqa: E402
from pipeline.placement import ResourcesUnavailable  # noqa: E402
from pipeline.staleness import StalenessGate  # noqa: E402
from tests.conftest import write_topic_chats  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HAS_GTO = importlib.util.find_spec("actors.gto_rollout") is not None
HAS_OPD = importlib.util.find_spec("actors.opd_rollout") is not None


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    return write_topic_chats(tmp_path_factory.mktemp("data") / "chats.jsonl", 64)


def _start_local_ray() -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)


@pytest.fixture(scope="module")
def _module_ray():
    """One fresh local cluster per module (never one another process started on this box)."""
    _start_local_ray()
    yield
    ray.shutdown()


@pytest.fixture
def local_ray(_module_ray):
    """The module's cluster, started again if a test disconnected from it (the `ray job submit`
    test must: its driver joins another cluster). Without this, the driver's own ``ray.init()``
    would start a cluster with this box's 2 CPUs, and a 3-CPU placement group would wait forever."""
    if not ray.is_initialized():
        _start_local_ray()
    yield


def overrides(out: Path, target_dir: Path, chat_file: Path, steps: int, *extra: str) -> list[str]:
    return [
        f"output_dir={out}",
        f"cache_dir={out.parent / 'cache'}",
        f"target.model={target_dir}",
        f"data.source={chat_file}",
        "data.max_length=48",
        "data.eval_fraction=0.1",
        "drafter.draft_vocab_size=256",
        "training.ttt_steps=2",
        "training.batch_size=2",
        "training.lr=3e-3",
        "training.warmup_steps=1",
        f"training.max_steps={steps}",
        "training.log_every=1",
        "training.eval_every=100",
        "training.eval_batches=1",
        "training.save_every=2",
        "training.device=cpu",
        "training.threads=1",
        "distributed.enabled=true",
        "distributed.num_learners=2",
        "distributed.num_rollout_actors=2",
        "distributed.cpus_per_actor=1",
        "distributed.collective_timeout_s=60",
        "distributed.resource_wait_timeout_s=300",  # a placement the cluster cannot give fails, never hangs
        *extra,
    ]


def config(tmp_path, target_dir, chat_file, steps, *extra):
    return load_config(None, overrides(tmp_path / "run", target_dir, chat_file, steps, *extra))


def assert_every_broadcast_bit_identical(result, versions: int) -> None:
    broadcasts = result.broadcasts
    assert [b["version"] for b in broadcasts if len(b["actor_sha256"]) == 2] == list(range(versions + 1))
    for b in broadcasts:
        assert b["actor_sha256"] and all(sha == b["source_sha256"] for sha in b["actor_sha256"]), b
        assert b["bytes"] > 0
    # Each update changes the drafter: successive versions hash differently.
    full = [b["source_sha256"] for b in broadcasts if len(b["actor_sha256"]) == 2]
    assert len(set(full)) == len(full)


def test_sync_sft_two_learners_two_actors_bit_identical_and_survives_a_killed_actor(
    local_ray, tmp_path, tiny_target_dir, chat_file
):
    cfg = config(tmp_path, tiny_target_dir, chat_file, 3, "distributed.zero_stage=2")
    result = run_distributed(cfg, faults=Faults(kill_actor_at_step=2, kill_actor=1))
    assert result.final_step == 3
    assert_every_broadcast_bit_identical(result, 3)
    assert result.actor_restarts == 1
    # The restarted actor was re-synced through the object store and checked.
    resync = [b for b in result.broadcasts if len(b["actor_sha256"]) == 1]
    assert resync and resync[0]["transport"] == "object_store" and resync[0]["version"] == 2
    # Sync mode: every experience was made by the drafter it trained; 2 ranks x 1 batch per step.
    assert [s["experience_versions"] for s in result.steps] == [[0, 0], [1, 1], [2, 2]]
    assert [s["batch_indices"] for s in result.steps] == [[0, 1], [2, 3], [4, 5]]
    out = result.output_dir
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    for key in ("loss", "top1/step1", "accept_length_proxy", "grad_norm", "lr", "staleness_max",
                "broadcast_s", "rollout_tokens_per_s", "learner_samples_per_s"):
        assert key in train[0], key
    # The time breakdown in sync mode, two ranks, a restart: the busiest rank's step and weight
    # sync fit in the wall time between updates (learner_idle_s >= 0), nothing negative.
    assert all(r[key] >= 0 for r in train for key in BREAKDOWN), [{k: r[k] for k in BREAKDOWN} for r in train]
    # every update but the last pushed the drafter; the breakdown's learner_broadcast_s is the
    # busiest rank's, which is 0 whenever rank 1 (it sends nothing) had the longer step
    assert all(r["broadcast_s"] > 0 for r in train[1:])
    assert {r["split"] for r in rows} == {"train", "eval"}
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "latest").read_text() == "step_000003"
    assert (out / "checkpoints" / "step_000002" / "deepspeed" / "state").is_dir()
    exported = load_file(result.drafter_dir / "model.safetensors")
    assert exported["lm_head.weight"].dtype == torch.bfloat16
    # The exported drafter is rank 0's final weights, which the last broadcast carried.
    final = load_file(out / "checkpoints" / "step_000003" / "drafter" / "model.safetensors")
    assert torch.equal(final["lm_head.weight"].to(torch.bfloat16), exported["lm_head.weight"])


def test_a_corrupted_receive_is_caught(local_ray, tmp_path, tiny_target_dir, chat_file):
    cfg = config(tmp_path, tiny_target_dir, chat_file, 2, "distributed.num_learners=1",
                 "distributed.num_rollout_actors=1")
    with pytest.raises(BroadcastMismatch, match=r"version 1 over gloo: rollout actors \[0\]"):
        run_distributed(cfg, faults=Faults(corrupt_at_version=1, corrupt_actor=0))


def test_a_failed_broadcast_is_reported_at_once(local_ray, tmp_path, tiny_target_dir, chat_file):
    cfg = config(tmp_path, tiny_target_dir, chat_file, 3, "distributed.num_learners=1",
                 "distributed.collective_timeout_s=600")
    started = time.time()
    # Actor 1 drops out of the version-2 sync (gloo): rank 0 would wait 600 s in the collective.
    with pytest.raises(BroadcastFailed, match="version 2 over gloo: rollout actor 1 .*failed.*--resume"):
        run_distributed(cfg, faults=Faults(fail_receive_at_version=2, corrupt_actor=1))
    assert time.time() - started < 300


def test_async_never_trains_on_experience_older_than_max_staleness(local_ray, tmp_path, tiny_target_dir, chat_file):
    cfg = config(tmp_path, tiny_target_dir, chat_file, 6, "distributed.mode=async", "distributed.max_staleness=1",
                 "distributed.rollouts_in_flight_per_actor=2", "training.save_every=100",
                 "distributed.prefetch_experiences=true")
    result = run_distributed(cfg)
    assert result.final_step == 6
    lags = [s["learner_version"] - v for s in result.steps for v in s["experience_versions"]]
    assert len(lags) == 12
    assert max(lags) <= 1 and min(lags) >= 0
    assert any(lag == 1 for lag in lags), "async mode never overlapped rollout with training"
    assert_every_broadcast_bit_identical(result, 6)
    report = json.loads((result.output_dir / "distributed_report.json").read_text())
    assert report["dropped_stale"] == result.dropped_stale
    # the share of learner ranks whose experiences came prefetched, with every update
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    prefetched = [r["learner_prefetched"] for r in rows if r.get("split") == "train"]
    assert len(prefetched) == 6 and all(0.0 <= p <= 1.0 for p in prefetched)


def test_resume_continues_from_the_checkpoint(local_ray, tmp_path, tiny_target_dir, chat_file):
    cfg = config(tmp_path, tiny_target_dir, chat_file, 3, "distributed.num_learners=1",
                 "distributed.num_rollout_actors=1", "distributed.broadcast_backend=object_store")
    first = run_distributed(cfg, steps_this_run=2)
    assert first.final_step == 2
    resumed = run_distributed(cfg, resume=True)
    assert resumed.final_step == 3
    # Version counters, data cursor and the drafter all continue: version 2 is what was saved.
    assert resumed.broadcasts[0]["version"] == 2
    assert resumed.broadcasts[0]["source_sha256"] == first.broadcasts[-1]["source_sha256"]
    assert [s["batch_indices"] for s in resumed.steps] == [[2]]
    with pytest.raises(FileExistsError, match="--resume"):
        run_distributed(cfg)


def test_a_killed_learner_stops_the_job_and_resume_matches_an_uninterrupted_run(
    local_ray, tmp_path, tiny_target_dir, chat_file
):
    extra = ("distributed.num_rollout_actors=1", "training.save_every=1", "distributed.collective_timeout_s=600")
    straight = run_distributed(config(tmp_path / "a", tiny_target_dir, chat_file, 3, *extra))
    cfg = config(tmp_path / "b", tiny_target_dir, chat_file, 3, *extra)
    started = time.time()
    with pytest.raises(LearnerDied, match="learner rank 1 died.*--resume"):
        run_distributed(cfg, faults=Faults(kill_learner_at_step=2, kill_learner=1))
    # It stopped at once, not when rank 0's collective with the dead rank timed out (600 s).
    assert time.time() - started < 300
    resumed = run_distributed(cfg, resume=True)
    assert resumed.final_step == 3 and [s["batch_indices"] for s in resumed.steps] == [[4, 5]]
    a = load_file(straight.drafter_dir / "model.safetensors")
    b = load_file(resumed.drafter_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_killed_driver_resumes_to_the_uninterrupted_result(local_ray, tmp_path, tiny_target_dir, chat_file):
    from speculative.config import dump_config

    extra = ("distributed.num_learners=1", "distributed.num_rollout_actors=1", "training.save_every=1",
             f"distributed.address={ray.get_runtime_context().gcs_address}")  # the driver joins this cluster
    straight = run_distributed(config(tmp_path / "a", tiny_target_dir, chat_file, 8, *extra))
    cfg = config(tmp_path / "b", tiny_target_dir, chat_file, 8, *extra)
    path = tmp_path / "b.yaml"
    path.write_text(dump_config(cfg))
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.train", "--config", str(path)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "b" / "run" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not (latest.is_file() and latest.read_text() >= "step_000002") and time.time() < deadline:
        assert driver.poll() is None, "the driver ended before it could be killed"
        time.sleep(0.1)
    driver.send_signal(signal.SIGKILL)  # the driver dies mid-run, between two checkpoints
    driver.wait()
    killed_at = int(latest.read_text().removeprefix("step_"))
    assert killed_at < 8
    resumed = run_distributed(cfg, resume=True)
    assert resumed.final_step == 8 and resumed.steps[0]["learner_version"] == killed_at
    a = load_file(straight.drafter_dir / "model.safetensors")
    b = load_file(resumed.drafter_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_nan_loss_on_one_rank_is_skipped_by_every_rank_and_counted(local_ray, tmp_path, tiny_target_dir, chat_file):
    cfg = config(tmp_path, tiny_target_dir, chat_file, 2, "distributed.num_rollout_actors=1")
    result = run_distributed(cfg, faults=Faults(nan_loss_at_step=1, nan_loss_rank=1))
    assert result.final_step == 2
    # The ranks stayed in step and the actor runs rank 0's exact weights.
    assert [b["version"] for b in result.broadcasts] == [0, 1, 2]
    assert all(b["actor_sha256"] == [b["source_sha256"]] for b in result.broadcasts)
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["skipped_nonfinite"] for r in train] == [0, 1] and all(np.isfinite(r["loss"]) for r in train if "loss" in r)
    weights = load_file(result.drafter_dir / "model.safetensors")
    assert all(torch.isfinite(t.float()).all() for t in weights.values())


def test_a_gpu_request_the_cluster_cannot_satisfy_fails_clearly_after_the_wait_timeout(
    local_ray, tmp_path, tiny_target_dir, chat_file, capsys
):
    cfg = config(tmp_path, tiny_target_dir, chat_file, 2, "distributed.gpus_per_learner=1",
                 "distributed.resource_wait_report_s=1", "distributed.resource_wait_timeout_s=3")
    with pytest.raises(ResourcesUnavailable, match=r"'GPU': 2\.0.*resource_wait_timeout_s = 3"):
        run_distributed(cfg)
    assert "waiting" in capsys.readouterr().out  # it waited (for an autoscaler) before giving up
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "drafter").exists()
    assert ray.util.placement_group_table() == {} or all(
        g["state"] == "REMOVED" for g in ray.util.placement_group_table().values())


def test_staleness_gate_admits_and_drops_by_version():
    gate = StalenessGate(max_staleness=1, per_step=2)
    # Learner at 5, training in flight, 2 queued: this rollout trains at version 7.
    assert gate.consume_version(5, True, 2) == 7
    assert gate.may_admit(5, True, 2, actor_version=6) and not gate.may_admit(5, True, 2, actor_version=5)
    kept, dropped = gate.select(5, [{"version": 4}, {"version": 3}, {"version": 5}])
    assert [m["version"] for m in kept] == [4, 5] and [m["version"] for m in dropped] == [3]
    assert gate.dropped == 1


@pytest.mark.parametrize("max_staleness", [1, 2, 3])
def test_while_the_learner_trains_max_staleness_experiences_may_be_queued_or_building(max_staleness):
    # One experience an update, actors at the learner's version: the bound is also how many rollout
    # actors can be busy during a step (at 2, a third actor, or a second whose experience waits,
    # is held back: bench/results/throughput_h200, "Eighth session").
    gate = StalenessGate(max_staleness=max_staleness, per_step=1)
    admitted = [queued for queued in range(6) if gate.may_admit(10, True, queued, actor_version=10)]
    assert admitted == list(range(max_staleness))
    # Between steps one more fits: it trains at the next version.
    assert gate.may_admit(10, False, max_staleness, actor_version=10)


OBJECTIVES = [
    pytest.param("sft", [], id="sft"),
    pytest.param("gto", ["gto.tree_depth=3", "gto.tree_top_k=2", "gto.tree_total_tokens=6",
                         "gto.groups_per_sequence=2", "gto.group_size=2", "gto.positions_per_forward=4"],
                 id="gto", marks=pytest.mark.skipif(not HAS_GTO, reason="actors.gto_rollout not merged yet")),
    # The authors' OPD recipe drops states whose target token lies outside the draft vocabulary; a
    # random target's argmax almost always does for 256 tokens, so this case drafts over all of it.
    pytest.param("opd", ["opd.chain_length=3", "opd.max_new_tokens=8", "drafter.draft_vocab_size=49152"],
                 id="opd", marks=pytest.mark.skipif(not HAS_OPD, reason="actors.opd_rollout not merged yet")),
    pytest.param("gto_opd", ["gto.tree_depth=3", "gto.tree_top_k=2", "gto.tree_total_tokens=6",
                             "gto.groups_per_sequence=2", "gto.group_size=2", "gto.positions_per_forward=4",
                             "opd.chain_length=3", "opd.max_new_tokens=8"], id="gto_opd"),
]


@pytest.mark.parametrize("objective,extra", OBJECTIVES)
def test_each_objective_runs_on_two_learners_and_two_actors(
    local_ray, tmp_path, tiny_target_dir, chat_file, objective, extra
):
    if objective == "sft":
        pytest.skip("covered by the sync SFT test above (same path, fewer cluster start-ups)")
    cfg = config(tmp_path, tiny_target_dir, chat_file, 2, f"training.objective={objective}", *extra)
    result = run_distributed(cfg)
    assert result.final_step == 2
    assert_every_broadcast_bit_identical(result, 2)
    assert [s["experience_versions"] for s in result.steps] == [[0, 0], [1, 1]]
    assert torch.isfinite(torch.tensor(result.train_metrics["loss"]))


# -- ray job submit to a `ray start --head` cluster -----------------------------------------
def _free_ports(n: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(n):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
        ports.append(sock.getsockname()[1])
    for sock in sockets:
        sock.close()
    return ports


WORKER_PORTS = 200  # the head's worker-port range: min .. min + WORKER_PORTS


def _head_ports() -> tuple[list[int], int]:
    """Seven free ports for the head's components and the first of a worker-port range that holds
    none of them: ``ray start`` refuses a component port inside that range, and about 1 draw in 20
    of eight free ports puts one there."""
    while True:
        *components, min_worker = _free_ports(8)
        if min_worker + WORKER_PORTS < 65536 and not any(
                min_worker <= port <= min_worker + WORKER_PORTS for port in components):
            return components, min_worker


def _start_head(ray_cli: list[str], temp_dir: Path, env: dict[str, str]) -> tuple[int, int]:
    """``ray start --head`` on free ports (dashboard, metrics export) -> those two ports. A port
    another process takes between the probe and the start fails it: retried on new ports, twice."""
    for _ in range(3):
        (gcs, dashboard, metrics, client, agent_http, agent_grpc, env_agent), min_worker = _head_ports()
        start = ray_cli + [
            "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
            "--include-dashboard=true", f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={env_agent}", f"--min-worker-port={min_worker}",
            f"--max-worker-port={min_worker + WORKER_PORTS}", "--num-cpus=4", f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ]
        started = subprocess.run(start, env=env, capture_output=True, text=True, timeout=120)
        if started.returncode == 0:
            return dashboard, metrics
        _stop_cluster(temp_dir)  # whatever part of it came up
    raise AssertionError(f"ray start failed 3 times; the last:\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}")


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def test_ray_job_submit_to_a_head_node_runs_training_and_exports_metrics(tmp_path, tiny_target_dir, chat_file):
    if ray.is_initialized():
        ray.shutdown()
    venv_bin = str(Path(sys.executable).parent)
    # token authentication, Ray's default for new clusters, made explicit for the CLI; the cluster's
    # own token (the CLI creates none: without ~/.ray/auth_token, as on a fresh machine, it refuses)
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "RAY_metrics_report_interval_ms": "1000",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    temp_dir = Path(f"/tmp/draftrl_ray_{os.getpid()}")
    ray_cli = [str(Path(venv_bin) / "ray")]
    dashboard, metrics = _start_head(ray_cli, temp_dir, env)
    try:
        # 6 updates: the driver's gauges are exported only while it lives (a counter outlives it), so
        # the job must run a few export intervals after its first update, also on a loaded machine
        job_config = overrides(tmp_path / "job_run", tiny_target_dir, chat_file, 6,
                               "distributed.num_learners=1", "distributed.num_rollout_actors=1")
        data: dict = {}
        for item in job_config:
            key, value = item.split("=", 1)
            node = data
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = yaml.safe_load(value)
        data["name"] = "jobtest"
        config_path = tmp_path / "job.yaml"
        config_path.write_text(yaml.safe_dump(data))
        submit = ray_cli + [
            "job", "submit", f"--address=http://127.0.0.1:{dashboard}", "--working-dir", str(REPO),
            "--runtime-env", str(REPO / "cluster" / "runtime_env.yaml"), "--",
            "python", "-m", "pipeline.train", "--config", str(config_path),
        ]
        job = subprocess.Popen(submit, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # Scrape the head's Prometheus endpoint while the job runs, until our gauges appear.
        scraped, deadline = "", time.time() + 240
        while time.time() < deadline and "draftrl_drafter_version" not in scraped:
            time.sleep(0.5)
            try:
                scraped = _scrape(f"http://127.0.0.1:{metrics}/metrics")
            except OSError:
                pass
            if job.poll() is not None and "draftrl_drafter_version" not in scraped:
                time.sleep(3)
                scraped = _scrape(f"http://127.0.0.1:{metrics}/metrics")
                break
        log, _ = job.communicate(timeout=300)
        assert job.returncode == 0, log[-4000:]
        assert "succeeded" in log, log[-4000:]
        assert "[draftrl] step 6/6" in log, log[-4000:]
        assert (tmp_path / "job_run" / "drafter" / "model.safetensors").is_file()
        gauges = [line for line in scraped.splitlines() if line.startswith("ray_draftrl_") or
                  line.startswith("draftrl_")]
        assert any("drafter_version" in line and 'run="jobtest"' in line for line in gauges), scraped[-3000:]
        assert any(line.split("{")[0].endswith("draftrl_loss") for line in gauges), gauges
    finally:
        _stop_cluster(temp_dir)


def _stop_cluster(temp_dir: Path) -> None:
    """Stop only the processes of the cluster this test started (``ray stop`` would stop every
    Ray cluster on the machine): those whose command line names its private temp dir."""
    def ours() -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if str(temp_dir).encode() in (entry / "cmdline").read_bytes():
                        pids.append(int(entry.name))
                except OSError:
                    pass
        return pids

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ours():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 5
        while ours() and time.time() < deadline:
            time.sleep(0.5)
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_micro_batches_merge_experiences_and_the_learner_reports_its_busy_fraction(
    local_ray, tmp_path, tiny_target_dir, chat_file
):
    """GTO async, one learner rank merging 2 experiences per micro-batch (training.micro_batch_size):
    staleness stays bounded, every broadcast verified, learner_busy and the broadcast rates logged."""
    gto = ["gto.tree_depth=3", "gto.tree_top_k=2", "gto.tree_total_tokens=6", "gto.groups_per_sequence=2",
           "gto.group_size=2", "gto.positions_per_forward=4"]
    cfg = config(tmp_path, tiny_target_dir, chat_file, 3, "training.objective=gto", *gto,
                 "distributed.num_learners=1", "distributed.mode=async", "distributed.max_staleness=1",
                 "training.grad_accum=2", "training.micro_batch_size=4", "training.save_every=100",
                 "distributed.broadcast_backend=object_store")
    result = run_distributed(cfg)
    assert result.final_step == 3
    lags = [s["learner_version"] - v for s in result.steps for v in s["experience_versions"]]
    assert len(lags) == 6 and 0 <= min(lags) and max(lags) <= 1
    assert_every_broadcast_bit_identical(result, 3)
    assert 0.0 < result.learner_busy <= 1.0
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("split") == "train"]
    assert train and all(0.0 < r["learner_busy"] <= 1.0 for r in train)
    assert all(r["broadcast_gb_s"] > 0 and r["broadcast_step_share"] >= 0 for r in train)
    report = json.loads((result.output_dir / "distributed_report.json").read_text())
    assert report["learner_busy"] == pytest.approx(result.learner_busy)
    # Where each update's time went, measured on both sides: no part negative, the learner's parts
    # within its step and its step plus weight sync within the wall time between updates.
    for r in train:
        assert all(key in r and r[key] >= 0 for key in BREAKDOWN), {k: r.get(k) for k in BREAKDOWN}
        inside = r["learner_fetch_s"] + r["learner_to_device_s"] + r["learner_compute_s"]
        assert 0 < r["learner_compute_s"] and inside <= r["learner_step_s"] + 1e-6
        assert r["learner_step_s"] + r["learner_broadcast_s"] <= r["update_interval_s"] + 1e-6
        assert r["rollout_build_s"] > 0 and r["rollout_experience_mb"] * 2e6 == pytest.approx(r["experience_bytes"])
        rollout = r["rollout_build_s"] + r["rollout_to_host_s"] + r["rollout_return_s"]
        assert rollout <= r["rollout_latency_s"] + 1e-3, r
    # Peak memory of the learner and rollout processes (CPU: peak RSS; each holds torch, the target
    # or the drafter and the run's tensors, so well above 0.1 GiB), logged with every update; one
    # learner rank's peak so far never falls.
    learner_peaks = [r["learner_peak_memory_gib"] for r in train]
    assert all(0.1 < r["learner_peak_memory_gib"] < 24 and 0.1 < r["rollout_peak_memory_gib"] < 24 for r in train)
    assert learner_peaks == sorted(learner_peaks), learner_peaks
    # object_store transport: rank 0 flattens and hashes the drafter after every update but the last
    assert all(r["learner_broadcast_s"] > 0 for r in train[1:])


def _sft_experience(seed: int, version: int = 0):
    from speculative.experience import SFTExperience

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (2, 6), generator=generator)
    return SFTExperience(ids, torch.ones_like(ids), torch.ones_like(ids), torch.randn(2, 6, 12, generator=generator),
                         torch.randn(2, 6, 9, generator=generator), ids.clone(), drafter_version=version)


def test_a_learner_takes_prefetched_experiences_only_for_the_same_refs(local_ray, tmp_path, tiny_target_dir,
                                                                       chat_file):
    """``LearnerWorker.prefetch`` (the async driver calls it while the previous update trains):
    train_step's refs get the merged micro-batches concat_experiences makes; other refs, a later
    prefetch or a failed fetch leave train_step to fetch for itself."""
    from learners.learner_group import LearnerWorker
    from speculative.experience import concat_experiences

    cfg = config(tmp_path, tiny_target_dir, chat_file, 1, "training.grad_accum=2", "training.micro_batch_size=4")
    worker = LearnerWorker(cfg.model_dump_json())  # set-up (DeepSpeed) is not needed to fetch
    parts = [_sft_experience(1), _sft_experience(2)]
    refs = [ray.put(p) for p in parts]
    assert worker.prefetch(refs) >= 0
    slot = worker._take_prefetch(list(refs))
    assert slot is not None and slot.error is None and len(slot.batches) == 1  # micro-batch 4 = both parts
    want = concat_experiences(parts, torch.device("cpu"))
    for got, expected in zip(slot.batches[0].__dict__.values(), want.__dict__.values()):
        assert got == expected if not isinstance(got, torch.Tensor) else torch.equal(got, expected)
    assert worker._take_prefetch(refs) is None  # taken once
    worker.prefetch(refs)
    assert worker._take_prefetch(refs[::-1]) is None  # other refs: dropped ...
    assert worker._take_prefetch(refs) is None  # ... for good
    worker.prefetch(refs[:1])
    worker.prefetch(refs)  # a later prefetch replaces the earlier one
    assert worker._take_prefetch(refs[:1]) is None
    failed = ray.remote(_fails).remote()
    worker.prefetch([failed, refs[1]])  # a fetch that fails is recorded, never raised
    assert worker._take_prefetch([failed, refs[1]]) is None


def _fails():
    raise ValueError("an experience that never arrives")
