"""Benchmark commands run end to end at a tiny scale and write their .md / .json / .png."""

import dataclasses
import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_env_throughput_writes_its_results(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks/env_throughput.py"), "--only", "physics", "--workers", "1",
           "--steps-scale", "0.05", "--out-dir", str(tmp_path)]
    subprocess.run(cmd, check=True, timeout=300, cwd=ROOT)
    data = json.loads((tmp_path / "env_throughput.json").read_text())
    assert [r["runner"] for r in data["rows"]] == ["bare simulator, in process", "our wrapper"]
    assert all(r["steps_per_s"] > 0 for r in data["rows"]) and data["seeds"] == [0]
    md = (tmp_path / "env_throughput.md").read_text()
    assert "| LIBERO spatial physics only |" in md and "Machine:" in md and "Command:" in md
    assert (tmp_path / "env_throughput.png").stat().st_size > 1000


def test_help_works():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/env_throughput.py"), "--help"], check=True,
                         capture_output=True, text=True, timeout=120, cwd=ROOT).stdout
    assert "--steps-scale" in out


def test_bad_flag_is_a_clear_error():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks/env_throughput.py"), "--no-such-flag"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode != 0 and "no-such-flag" in (res.stderr + res.stdout)


def test_uav_formation_apf_only_trains_nothing(tmp_path):
    """`--apf-only`: the APF rows alone, on the evaluation's episodes (its seed), and no run trained."""
    cmd = [sys.executable, str(ROOT / "benchmarks/uav_formation.py"), "--apf-only", "--eval-envs", "8", "--dynamics",
           "pointmass", "--run-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path), "--name", "apf"]
    out = subprocess.run(cmd, check=True, timeout=300, cwd=ROOT, capture_output=True, text=True).stdout
    assert "mappo_uav_formation.py" not in out and not (tmp_path / "runs").exists()
    data = json.loads((tmp_path / "apf.json").read_text())
    assert [(r["preset"], r["method"]) for r in data["rows"]] == [(p, "APF") for p in ("static", "dynamic", "mixed")]
    assert data["seeds"] == [20_000] and "APF controller alone" in (tmp_path / "apf.md").read_text()


def test_uav_formation_table_runs_resumes_and_writes_its_results(tmp_path):
    """Tiny budget (point-mass drones): the learned rows come from real runs of the script, APF from the same
    evaluation; a second call reads the finished runs back instead of training again, and so does a call without
    the run directories (another machine), from the runs' records, unless a record came from other code."""
    base = [sys.executable, str(ROOT / "benchmarks/uav_formation.py"), "--seeds", "1", "--frames", "0.001,0.001,0.001",
            "--num-envs", "16", "--eval-envs", "8", "--dynamics", "pointmass", "--threads", "1", "--run-dir",
            str(tmp_path / "runs"), "--out-dir", str(tmp_path / "out"), "--variants"]
    cmd = base + ["ours", "MLP encoder"]
    first = subprocess.run(cmd, check=True, timeout=900, cwd=ROOT, capture_output=True, text=True).stdout
    assert first.count("mappo_uav_formation.py --weights paper") == 2
    data = json.loads((tmp_path / "out/uav_formation.json").read_text())
    assert [(r["preset"], r["method"]) for r in data["rows"]] == [
        (p, m) for p in ("static", "dynamic", "mixed") for m in ("APF", "ours", "MLP encoder")]
    for row in data["rows"]:
        assert 0.0 <= row["collision_free_mean"] <= 1.0 and row["formation_error_mean"] >= 0.0
        assert (row.get("env_steps_M", 0) > 0) == (row["method"] != "APF")
        # what ended the episodes, for every method: a failed episode ended by at least one event
        ended = [row[f"ended_{c}_mean"] for c in ("crash", "too_close", "hit_column", "hit_ball", "hit_wall")]
        assert row["ended_by"] != "n/a" and sum(ended) >= 1.0 - row["collision_free_mean"] - 1e-6
    md = (tmp_path / "out/uav_formation.md").read_text()
    assert "Targets:" in md and "static: ours collision-free" in md and "Seeds: 1" in md
    assert (tmp_path / "out/uav_formation.png").stat().st_size > 1000
    again = subprocess.run(cmd, check=True, timeout=600, cwd=ROOT, capture_output=True, text=True).stdout
    assert "mappo_uav_formation.py --weights paper" not in again  # read back, not retrained
    other = [a if a != "0.001,0.001,0.001" else "0.002,0.001,0.001" for a in cmd]
    stale = subprocess.run(other, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert stale.returncode != 0 and "was trained with" in stale.stderr + stale.stdout  # never mixes budgets
    bad = subprocess.run(cmd[:2] + ["--variants", "transformer"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode != 0 and "unknown variants" in bad.stderr + bad.stdout
    bad = subprocess.run(cmd + ["--name", "../elsewhere"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode != 0 and "a file name, no path" in bad.stderr + bad.stdout

    # the run records: a later call without the run directories (another machine) reads the runs back from them
    records = sorted((tmp_path / "out/uav_formation_runs").glob("*.json"))
    assert [r.name.split("__")[:2] for r in records] == [["bench_mlp_encoder", "1"], ["bench_ours", "1"]]
    ours = json.loads(records[1].read_text())
    assert ours["eval"]["mixed"]["collision_free"] == data["rows"][-2]["collision_free_mean"]  # mixed, ours
    assert ours["settings"]["frames"] == "0.001,0.001,0.001" and len(ours["code"]) == 16 and ours["env_steps"] > 0
    shutil.rmtree(tmp_path / "runs")
    moved = subprocess.run(cmd, check=True, timeout=600, cwd=ROOT, capture_output=True, text=True).stdout
    assert "mappo_uav_formation.py --weights paper" not in moved and moved.count("read back from") == 2
    assert json.loads((tmp_path / "out/uav_formation.json").read_text())["rows"] == data["rows"]
    assert "ours seed 1: " + ours["date"] in (tmp_path / "out/uav_formation.md").read_text()
    # a record of other code is not used: that run trains again (and its record is replaced)
    records[1].write_text(json.dumps({**ours, "code": "0" * 16}))
    retrained = subprocess.run(base + ["ours"], check=True, timeout=600, cwd=ROOT, capture_output=True,
                               text=True).stdout
    assert "came from other code" in retrained and retrained.count("mappo_uav_formation.py --weights paper") == 1
    assert json.loads(records[1].read_text())["code"] == ours["code"]
    records[0].write_text("{not json")
    broken = subprocess.run(base + ["MLP encoder"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert broken.returncode != 0 and "not a readable run record" in broken.stderr + broken.stdout


def test_uav_run_resumed_under_other_code_is_recorded_only_if_that_code_trains_the_same(tmp_path, monkeypatch):
    """An interrupted run resumed after the code changed keeps its record only when SAME_TRAINING vouches for the
    code it started with, for that variant (the record then names that code); else it resumes without one."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import uav_formation as bench

    monkeypatch.setattr(bench, "code_hash", lambda: "new0000000000000")
    # links chain back, each only for the variants it lists
    monkeypatch.setattr(bench, "SAME_TRAINING", {"new0000000000000": {"mid0000000000000": ("ours", "MLP encoder")},
                                                 "mid0000000000000": {"old0000000000000": ("ours", "no curriculum"),
                                                                      "new0000000000000": ("ours",)}})
    assert bench.same_training_codes("ours") == ("new0000000000000", "mid0000000000000", "old0000000000000")
    assert bench.same_training_codes("MLP encoder") == ("new0000000000000", "mid0000000000000")
    assert bench.same_training_codes("no curriculum") == ("new0000000000000",)
    monkeypatch.setattr(bench, "SAME_TRAINING", {"new0000000000000": {"old0000000000000": ("ours",)}})
    summary = {"eval": {"static": {"collision_free": 0.5, "formation_error": 0.4}}, "env_steps": 10, "weights": None}

    real_run = subprocess.run

    def fake_training(cmd, **kwargs):  # the resumed run finishes
        if "--exp-name" not in cmd:
            return real_run(cmd, **kwargs)
        assert "--resume" in cmd
        run = Path(cmd[cmd.index("--run-dir") + 1]) / f"uav_formation__{cmd[cmd.index('--exp-name') + 1]}__1"
        (run / "summary.json").write_text(json.dumps(summary))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(bench.subprocess, "run", fake_training)
    args = bench.Args(seeds=[1], run_dir=str(tmp_path / "runs"), out_dir=str(tmp_path / "out"))
    # SAME_TRAINING vouches for ours only: the MLP encoder started on the same old code, or on unknown code, is not
    cases = (("ours", "old0000000000000", True), ("MLP encoder", "old0000000000000", False),
             ("no curriculum", "gone000000000000", False))
    for variant, started_with, recorded in cases:
        run = tmp_path / "runs" / f"uav_formation__{bench.run_name(variant)}__1"
        run.mkdir(parents=True)
        (run / "checkpoint.pt").write_bytes(b"interrupted")
        (run / "bench_code.json").write_text(json.dumps({"code": started_with}))
        bench.train_one(args, variant, 1)
        record = bench.record_path(args, variant, 1)
        assert record.exists() == recorded, variant
        if recorded:
            assert json.loads(record.read_text())["code"] == started_with
            # read back from its run directory by a call with other flags: the table says how it trained
            later = bench.train_one(dataclasses.replace(args, workers=args.workers + 1, threads=args.threads + 1),
                                    variant, 1)
            assert (later["workers"], later["threads"]) == (args.workers, args.threads)
            shutil.rmtree(run)  # another machine: read back through SAME_TRAINING
            assert bench.train_one(args, variant, 1)["eval"] == summary["eval"]


def test_uav_runs_with_side_walls_are_other_runs_and_those_without_keep_their_records(tmp_path, monkeypatch):
    """--corridor-walls (and --relative-self-pos, --static-mode, --static-top-k, --formation-reward) is a setting of
    its own (another record and run directory, and the flag reaches the script);
    without it the settings, and so the committed records' names, are what they were before walls existed."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import uav_formation as bench

    assert bench.Args().eval_envs == 512  # the default since 2026-12-07 (2 x the envs, as the release)
    Args = functools.partial(bench.Args, eval_envs=256)  # the committed records' evaluation
    plain, walled = Args(), Args(corridor_walls=2.0)
    assert bench.run_settings(plain) == {"frames": "0.4,4,4", "num_envs": 256, "eval_envs": 256, "dynamics": "ctbr"}
    assert bench.record_path(plain, "ours", 1).name == "bench_ours__1__3b48e9f4.json"
    assert (ROOT / "benchmarks/results/uav_formation_runs/bench_ours__1__3b48e9f4.json").exists()
    assert bench.run_settings(walled)["corridor_walls"] == 2.0
    assert bench.record_path(walled, "ours", 1).name != bench.record_path(plain, "ours", 1).name
    # and their own run directories, so a run with walls and one without can share --run-dir
    assert bench.exp_name(plain, "ours") == "bench_ours" and bench.exp_name(walled, "ours") == "bench_ours_walls2"
    # so is --relative-self-pos
    relative = Args(corridor_walls=2.0, relative_self_pos=True)
    assert bench.run_settings(relative) == {**bench.run_settings(walled), "relative_self_pos": True}
    assert bench.exp_name(relative, "ours") == "bench_ours_walls2_relpos"
    assert "relative_self_pos" not in bench.run_settings(walled)
    # so is another column observation (--static-mode); the default adds nothing to the settings
    diff = Args(relative_self_pos=True, static_mode="sdf9_diff")
    assert "static_mode" not in bench.run_settings(Args(relative_self_pos=True))
    assert bench.run_settings(diff) == {**bench.run_settings(Args(relative_self_pos=True)),
                                        "static_mode": "sdf9_diff"}
    assert bench.exp_name(diff, "ours") == "bench_ours_relpos_sdf9_diff"
    assert bench.record_path(diff, "ours", 2).name not in ("bench_ours__2__fa6207cc.json",  # relpos, sdf9
                                                            bench.record_path(plain, "ours", 2).name)
    assert bench.record_path(Args(relative_self_pos=True), "ours", 2).name == "bench_ours__2__fa6207cc.json"
    # so is the released formation reward (--formation-reward release)
    release = dataclasses.replace(diff, formation_reward="release")
    assert "formation_reward" not in bench.run_settings(diff)
    assert bench.run_settings(release) == {**bench.run_settings(diff), "formation_reward": "release"}
    assert bench.exp_name(release, "ours") == "bench_ours_relpos_sdf9_diff_release_form"
    assert bench.record_path(release, "ours", 2).name != bench.record_path(diff, "ours", 2).name
    # so is the number of column tokens (--static-top-k, with --static-mode tokens)
    top3 = dataclasses.replace(release, static_mode="tokens", static_top_k=3)
    assert bench.run_settings(top3) == {**bench.run_settings(release), "static_mode": "tokens", "static_top_k": 3}
    assert bench.exp_name(top3, "ours") == "bench_ours_relpos_tokens_top3_release_form"
    # and so is the slot term on top of the release (--formation-reward release_slot)
    slot = dataclasses.replace(top3, formation_reward="release_slot")
    assert bench.run_settings(slot) == {**bench.run_settings(top3), "formation_reward": "release_slot"}
    assert bench.exp_name(slot, "ours") == "bench_ours_relpos_tokens_top3_release_slot_form"
    assert bench.record_path(slot, "ours", 1).name != bench.record_path(top3, "ours", 1).name
    assert bench.record_path(top3, "ours", 1).name == "bench_ours__1__63f5b239.json"  # the committed top-3 record
    # and the height term kept in full while a ball flies (--full-height-reward), a bare flag
    height = dataclasses.replace(slot, full_height_reward=True)
    assert bench.run_settings(height) == {**bench.run_settings(slot), "full_height_reward": True}
    assert bench.exp_name(height, "ours") == "bench_ours_relpos_tokens_top3_release_slot_form_fullheight"
    assert bench.record_path(height, "ours", 1).name != bench.record_path(slot, "ours", 1).name
    # and the slot term kept in full while a ball flies (--full-slot-reward), a bare flag
    rigid = dataclasses.replace(height, full_slot_reward=True)
    assert bench.run_settings(rigid) == {**bench.run_settings(height), "full_slot_reward": True}
    assert bench.exp_name(rigid, "ours") == "bench_ours_relpos_tokens_top3_release_slot_form_fullheight_fullslot"
    assert bench.record_path(rigid, "ours", 1).name != bench.record_path(height, "ours", 1).name
    # and one lr decay across the curriculum (--no-lr-restart): an option on by default, sent as its negation
    once = dataclasses.replace(rigid, lr_restart=False)
    assert "lr_restart" not in bench.run_settings(rigid)
    assert bench.run_settings(once) == {**bench.run_settings(rigid), "lr_restart": False}
    assert bench.exp_name(once, "ours") == bench.exp_name(rigid, "ours") + "_nolrrestart"
    assert bench.record_path(once, "ours", 1).name != bench.record_path(rigid, "ours", 1).name
    # and the value clip centred as before 2026-12-07 (--value-clip-centre renormalised)
    renorm = dataclasses.replace(once, value_clip_centre="renormalised")
    assert bench.run_settings(renorm) == {**bench.run_settings(once), "value_clip_centre": "renormalised"}
    assert bench.exp_name(renorm, "ours") == bench.exp_name(once, "ours") + "_vclip" + "renormalised"
    assert bench.record_path(renorm, "ours", 1).name != bench.record_path(once, "ours", 1).name
    # and the flags reach the script
    sent, real_run = [], subprocess.run

    def fake_training(cmd, **kwargs):
        if "--exp-name" not in cmd:
            return real_run(cmd, **kwargs)
        sent.append(cmd)
        run = Path(cmd[cmd.index("--run-dir") + 1]) / f"uav_formation__{cmd[cmd.index('--exp-name') + 1]}__1"
        (run / "summary.json").write_text(json.dumps({"eval": {}, "env_steps": 1, "weights": None}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(bench.subprocess, "run", fake_training)
    for args in (walled, relative, diff, release, top3, slot, height, rigid, once, renorm):
        bench.train_one(dataclasses.replace(args, seeds=[1], run_dir=str(tmp_path / "runs"),
                                            out_dir=str(tmp_path / "out"), records=False), "ours", 1)
    assert [cmd[cmd.index("--corridor-walls") + 1] for cmd in sent] == ["2.0", "2.0"] + ["0.0"] * 8
    assert ["--relative-self-pos" in cmd for cmd in sent] == [False] + [True] * 9
    assert ["--full-height-reward" in cmd for cmd in sent] == [False] * 6 + [True] * 4
    assert ["--full-slot-reward" in cmd for cmd in sent] == [False] * 7 + [True] * 3
    assert ["--no-lr-restart" in cmd for cmd in sent] == [False] * 8 + [True] * 2
    assert not any("--lr-restart" in cmd for cmd in sent)
    assert [cmd[cmd.index("--value-clip-centre") + 1] if "--value-clip-centre" in cmd else None for cmd in sent] == [
        None] * 9 + ["renormalised"]
    assert [cmd[cmd.index("--static-mode") + 1] if "--static-mode" in cmd else None for cmd in sent] == [
        None, None, "sdf9_diff", "sdf9_diff"] + ["tokens"] * 6
    assert [cmd[cmd.index("--static-top-k") + 1] if "--static-top-k" in cmd else None for cmd in sent] == [
        None, None, None, None] + ["3"] * 6
    assert [cmd[cmd.index("--formation-reward") + 1] if "--formation-reward" in cmd else None for cmd in sent] == [
        None, None, None, "release", "release"] + ["release_slot"] * 5
    assert [cmd[cmd.index("--exp-name") + 1] for cmd in sent] == ["bench_ours_walls2", "bench_ours_walls2_relpos",
                                                                  "bench_ours_relpos_sdf9_diff",
                                                                  "bench_ours_relpos_sdf9_diff_release_form",
                                                                  "bench_ours_relpos_tokens_top3_release_form",
                                                                  "bench_ours_relpos_tokens_top3_release_slot_form",
                                                                  "bench_ours_relpos_tokens_top3_release_slot_form"
                                                                  "_fullheight",
                                                                  "bench_ours_relpos_tokens_top3_release_slot_form"
                                                                  "_fullheight_fullslot",
                                                                  "bench_ours_relpos_tokens_top3_release_slot_form"
                                                                  "_fullheight_fullslot_nolrrestart",
                                                                  "bench_ours_relpos_tokens_top3_release_slot_form"
                                                                  "_fullheight_fullslot_nolrrestart_vclip"
                                                                  "renormalised"]


def test_weight_sync_benchmark_runs_every_variant(tmp_path):
    """Tiny sizes: every transport (ZMQ in-process, shared memory in-process and to another process, TCP) syncs
    and checks the actor's values, and the table comes out with a ratio for each."""
    cmd = [sys.executable, str(ROOT / "benchmarks/weight_sync.py"), "--sizes", "100000", "--repeats", "3",
           "--out-dir", str(tmp_path)]
    out = subprocess.run(cmd, timeout=600, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    row = json.loads((tmp_path / "weight_sync.json").read_text())["rows"][0]
    for variant in ("inproc", "inproc_flat_zero_copy", "shm_flat_zero_copy", "xproc_shm_flat_zero_copy",
                    "tcp_flat_zero_copy"):
        assert row[f"{variant}_publish_apply_ms"] > 0 and row[f"{variant}_vs_memcpy"] > 0, variant
    assert row["memcpy_ms"] == row["shm_flat_zero_copy_memcpy_ms"]
    assert row["shm_floor_ms"] > 0 and row["inproc_zmq_floor_ms"] > 0
    header = (tmp_path / "weight_sync.md").read_text().split("\n| params")[1].split("\n")[0]
    assert "shm_floor_vs_memcpy" in header and "zmq_floor_vs_memcpy" in header  # the md table as the json
    assert (tmp_path / "weight_sync.png").stat().st_size > 1000


def test_weight_sync_module_tree_benchmark_syncs_both_ways(tmp_path):
    """`--module-tree`: the π0-shaped model syncs with the tensor list reused and walked afresh (the run asserts the
    actor's values), over ZMQ and shared memory."""
    cmd = [sys.executable, str(ROOT / "benchmarks/weight_sync.py"), "--module-tree", "--repeats", "1",
           "--out-dir", str(tmp_path)]
    subprocess.run(cmd, check=True, timeout=600, cwd=ROOT, capture_output=True)
    rows = json.loads((tmp_path / "weight_sync_module_tree.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["inproc", "shm_flat_zero_copy"]
    for r in rows:
        assert r["tensors"] == 776 and r["modules"] == 751
        assert r["list_reused_ms"] > 0 and r["walked_each_publish_ms"] > 0 and r["state_dict_walk_ms"] > 0


def test_uav_column_obs_probe_writes_its_results_and_the_re_encoding_reads_faster(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks/uav_column_obs.py"), "--seeds", "1", "--steps", "300",
           "--checkpoints", "300", "--train-size", "4000", "--test-size", "2000", "--out-dir", str(tmp_path)]
    subprocess.run(cmd, check=True, timeout=300, cwd=ROOT, capture_output=True)
    data = json.loads((tmp_path / "uav_column_obs.json").read_text())
    rows = {r["encoding"]: r for r in data["rows"]}
    assert set(rows) == {"sdf9", "sdf9_diff"} and all(r["steps"] == 300 for r in data["rows"])
    side = {k: r["side_acc_per_seed"][0] for k, r in rows.items()}
    assert all(0 <= v <= 1 for v in side.values())
    assert side["sdf9_diff"] > side["sdf9"] + 0.15, side  # which side the column is on: read within 300 steps
    assert "Machine:" in (tmp_path / "uav_column_obs.md").read_text()
    assert (tmp_path / "uav_column_obs.png").stat().st_size > 1000
    bad = subprocess.run(cmd + ["--checkpoints", "5000"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode != 0 and "--checkpoints" in bad.stderr


def test_uav_formation_shape_takes_the_error_apart_rotation_size_shape():
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks.uav_formation_shape import aligned_errors, pair_distances
    from common.uav_formation_env import formation_offsets

    slots = formation_offsets(3, 1.0)
    a = 0.5
    yaw = torch.tensor([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]], dtype=torch.float32)
    tilt = torch.tensor([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]], dtype=torch.float32)
    squeezed = slots * torch.tensor([1.0, 0.6, 1.0])
    x = torch.stack([slots @ yaw.T, slots @ tilt.T, 1.5 * slots, squeezed, slots[[0, 2, 1]]])
    x = x + torch.tensor([3.0, -2.0, 1.5])
    err = aligned_errors(x, slots)
    assert np.allclose(err["formation_error"][0], 2 * np.sin(a / 2), atol=1e-5)  # a chord of the unit circle
    assert err["yaw_aligned"][0] < 1e-5  # a turn about the vertical is all yaw
    assert err["yaw_aligned"][1] > 0.1 and err["rotation_aligned"][1] < 1e-5  # a tilt needs the 3-D rotation
    assert np.allclose(err["rotation_aligned"][2], 0.5, atol=1e-5) and err["shape_error"][2] < 1e-5  # size only
    assert err["shape_error"][3] > 0.05  # a squeezed triangle is another shape: nothing aligns it away
    assert np.allclose(pair_distances(x[3:])[0, 2], 0.6 * np.sqrt(3), atol=1e-5)  # drones 1-2 lie along y
    # a mirror image (drones 1 and 2 swapped): no turn about the vertical undoes it, a half turn out of the plane does,
    # and the best rotation stays a rotation (det +1), not the reflection that would map the slots onto it in-plane
    assert err["yaw_aligned"][4] > 1.0 and err["rotation_aligned"][4] < 1e-5 and err["shape_error"][4] < 1e-5


@pytest.fixture(scope="module")
def toy_uav_run(tmp_path_factory):
    """One toy run of algos/mappo_uav_formation.py (column tokens, the 3 nearest) for the benchmarks that fly runs."""
    run_dir = tmp_path_factory.mktemp("uav_runs")
    train = [sys.executable, str(ROOT / "algos/mappo_uav_formation.py"), "--weights", "paper", "--frames",
             "0.0005,0.0005,0.0005", "--num-envs", "16", "--num-steps", "16", "--num-minibatches", "4",
             "--eval-envs", "4", "--eval-presets", "free", "--max-steps", "40", "--dynamics", "pointmass",
             "--static-mode", "tokens", "--static-top-k", "3", "--torch-threads", "1", "--plot-episodes", "0",
             "--no-cuda", "--exp-name", "toy", "--run-dir", str(run_dir)]
    subprocess.run(train, check=True, timeout=600, cwd=ROOT, capture_output=True)
    return run_dir / "uav_formation__toy__1"


def test_uav_formation_shape_flies_a_trained_run_and_apf(tmp_path, toy_uav_run):
    run = toy_uav_run
    cmd = [sys.executable, str(ROOT / "benchmarks/uav_formation_shape.py"), "--runs", str(run), "--presets", "free",
           "mixed", "--eval-envs", "6", "--max-steps", "30", "--out-dir", str(tmp_path)]
    subprocess.run(cmd, check=True, timeout=600, cwd=ROOT, capture_output=True)
    rows = json.loads((tmp_path / "uav_formation_shape.json").read_text())["rows"]
    assert [(r["method"], r["preset"]) for r in rows] == [("toy seed 1", "free"), ("APF", "free"),
                                                          ("toy seed 1", "mixed"), ("APF", "mixed")]
    for r in rows:
        assert len(r["pair_distances"]) == 3 and all(d > 0 for d in r["pair_distances"])
        assert r["formation_error"] >= r["shape_error"] >= 0
        assert abs(r["formation_error"] - r["env_formation_error"]) < 1e-3  # the same steps as the env's figure
    assert rows[1]["formation_error"] < 0.05  # APF holds the slots when nothing is in the way
    assert (tmp_path / "uav_formation_shape.png").stat().st_size > 1000
    bad = subprocess.run(cmd[:2] + ["--runs", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode != 0 and "agent.pt" in bad.stderr


def test_uav_column_hits_names_the_column_hit_and_its_rank_before():
    """Drones flown straight through the column field (point mass, 2 m/s): every column hit is found, with the
    column the hitting drone touched, and that column's rank among the drone's columns 1, 10 and 25 steps earlier,
    recomputed here from the path the actor saw."""
    import math

    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks.report import load_algo
    from benchmarks.uav_column_hits import fly

    algo = load_algo("mappo_uav_formation")
    run_args = algo.Args(dynamics="pointmass", eval_envs=64, max_steps=300)
    ref_obs = algo.make_env(run_args, "mixed", 2, 0, "cpu").reset()
    seen = []  # the state before each step: time 0, 1, ...

    def straight(env, obs):
        seen.append((env.p.clone(), env.columns.clone(), env.col_active.clone()))
        action = torch.zeros(env.E, env.N, 4)
        action[..., 1] = math.atanh(2 / 3)  # 2 m/s along y in point-mass mode
        return action

    result = fly(algo, run_args, straight, "static", 20_000, ref_obs, [1, 10, 25])
    assert result["episodes"] == 64 and len(result["hits"]) >= 5
    ranks = []
    for hit in result["hits"]:
        e, end, drone, col = hit["env"], hit["end"], hit["drone"], hit["column"]
        columns, active = seen[0][1][e], seen[0][2][e]  # the env's first layout, kept until its episode ends
        path = torch.stack([state[0][e, drone, :2] for state in seen[:end]])  # times 0 .. end - 1
        assert active[col] and float((path[-1] - columns[col]).norm()) < 0.15 + 2 * 0.02 * 1.5  # within one step
        assert set(hit["ranks"]) == {lag for lag in (1, 10, 25) if lag <= end}
        for lag, rank in hit["ranks"].items():
            dist = (columns - path[end - lag]).norm(dim=-1).masked_fill(~active, 1e6)
            assert rank == int((dist < dist[col]).sum())
            ranks.append(rank)
    assert 0 in ranks and max(ranks) > 0  # both cases occur: a column in view, and one hidden behind another


def test_uav_column_hits_command_writes_its_table(tmp_path, toy_uav_run):
    cmd = [sys.executable, str(ROOT / "benchmarks/uav_column_hits.py"), "--runs", str(toy_uav_run), "--eval-envs",
           "8", "--max-steps", "60", "--out-dir", str(tmp_path)]
    subprocess.run(cmd, check=True, timeout=600, cwd=ROOT, capture_output=True)
    rows = json.loads((tmp_path / "uav_column_hits.json").read_text())["rows"]
    assert [(r["method"], r["preset"], r["episodes"]) for r in rows] == [("toy seed 1", "static", 8),
                                                                         ("toy seed 1", "mixed", 8)]
    assert all(0 <= r["column_hits"] <= r["episodes"] for r in rows)
    assert (tmp_path / "uav_column_hits.png").stat().st_size > 1000
    bad = subprocess.run(cmd + ["--presets", "dynamic"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode != 0 and "with columns" in bad.stderr


def test_uav_formation_shape_counts_each_env_first_episode_to_its_last_step():
    """Half the envs dive into the ground early: their episodes end (and are reset) at different steps, and only
    each env's first episode, up to and with its last step, counts: the formation error equals the env's own."""
    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks.report import load_algo
    from benchmarks.uav_formation_shape import fly

    algo = load_algo("mappo_uav_formation")
    run_args = algo.Args(dynamics="pointmass", eval_envs=8, max_steps=60)
    ref_obs = algo.make_env(run_args, "mixed", 2, 0, "cpu").reset()

    def act(env, obs):  # even envs: down at full speed, each drone a little differently; odd envs: sideways drift
        a = torch.zeros(env.E, env.N, 4)
        a[0::2, :, 2] = -3.0 - torch.arange(env.N)
        a[1::2, :, 0] = 0.3 * torch.arange(env.N)
        return a

    r = fly(algo, run_args, act, "free", 0, ref_obs)
    assert r["collision_free"] == 0.5  # the divers crash, the rest fly all 60 steps
    assert r["formation_error"] > 0.01
    assert abs(r["formation_error"] - r["env_formation_error"]) < 1e-5


def test_uav_formation_shape_splits_the_error_by_ball_phase():
    """A scripted formation that holds its slots until the first ball is in the air, then drone 0 drifts sideways
    for good: no error before the throw, a growing one while the ball flies, a larger one after it (between throws
    and after the last); a preset without balls is all 'before'."""
    import math

    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks.report import load_algo
    from benchmarks.uav_formation_shape import PHASES, STEP_SHARES, ball_phase, fly

    algo = load_algo("mappo_uav_formation")
    run_args = algo.Args(dynamics="pointmass", eval_envs=6, max_steps=700)
    ref_obs = algo.make_env(run_args, "mixed", 2, 0, "cpu").reset()
    drifting = torch.zeros(run_args.eval_envs, dtype=torch.bool)

    def act(env, obs):
        drifting.logical_or_(ball_phase(env) == 1)
        a = torch.zeros(env.E, env.N, 4)
        a[drifting, 0, 0] = 0.3
        return a

    r = fly(algo, run_args, act, "dynamic", 0, ref_obs)
    before, in_air, after = (r[k] for k in PHASES)
    assert before < 0.02 < in_air < after, r
    assert abs(sum(r[k] for k in STEP_SHARES) - 1) < 1e-5 and all(r[k] > 0.05 for k in STEP_SHARES), r
    r = fly(algo, run_args, act, "free", 0, ref_obs)
    assert r[STEP_SHARES[0]] == 1 and math.isnan(r[PHASES[1]]) and math.isnan(r[PHASES[2]])
    assert abs(r[PHASES[0]] - r["formation_error"]) < 1e-5


def fake_pirl_run(calls: list, task_dir: str, start_rate: float = 0.25):
    """Stands in for the subprocesses of benchmarks/pirl.py: records each command and leaves what a finished run of
    that script leaves (an SFT start; an eval-only run's or an RL run's summary)."""

    def fake_run(cmd):
        calls.append(cmd)
        flag = lambda name: cmd[cmd.index(name) + 1]  # noqa: E731
        run_dir = Path(flag("--run-dir")) / f"{task_dir}__{flag('--exp-name')}__{flag('--seed')}"
        if Path(cmd[1]).name == "sft_pi0.py":
            (run_dir / "final").mkdir(parents=True)
            (run_dir / "final" / "pi0_config.json").write_text("{}")
            return
        run_dir.mkdir(parents=True)
        eval_only = flag("--total-iterations") == "0"
        history = [{"iteration": 0, "global_step": 0, "minutes": 0.0, "success_rate": start_rate, "episodes": 100}] \
            if "--no-eval-at-start" not in cmd else []
        if not eval_only:
            history.append({"iteration": 7, "global_step": 1000, "minutes": 8.0, "success_rate": 0.5, "episodes": 100})
        # the Flow-SDE runs time their envs.step (384 of the 480 s); the Flow-Noise ones stand for runs from before
        sim = {"sim_seconds": 0.0 if eval_only else 384.0} if Path(cmd[1]).name == "flow_sde_pi0.py" else {}
        (run_dir / "summary.json").write_text(json.dumps(
            {"history": history, "env_steps": 0 if eval_only else 1000, "minutes": 0.0 if eval_only else 8.0,
             "args": {"num_envs": 4, "action_chunk": 8}, **sim}))

    return fake_run


def test_pirl_sft_only_makes_each_seeds_sft_start_and_its_eval_once_and_no_rl_run(tmp_path, monkeypatch):
    """`--sft-only` runs the SFT script per seed (its budget is steps) and the start's eval (an eval-only run of the
    RL script), and stops before the wall-clock-budgeted RL runs; a second call reuses the finished ones."""
    import benchmarks.pirl as pirl

    calls = []
    monkeypatch.setattr(pirl, "run", fake_pirl_run(calls, "libero_object_0-3"))
    args = dict(env="libero", task="libero_object/0-3", seeds=[1, 2], sft_only=True, run_dir=tmp_path / "runs",
                demo_dir=tmp_path / "demos", out_dir=tmp_path / "out")
    pirl.main(pirl.Args(**args))
    assert [Path(c[1]).name for c in calls] == ["sft_pi0.py", "flow_sde_pi0.py"] * 2
    assert [c[c.index("--seed") + 1] for c in calls] == ["1", "1", "2", "2"]
    sft, evals = calls[::2], calls[1::2]
    assert all(c[c.index("--demos") + 1] == str(tmp_path / "demos" / "libero_object_0-3_n20") for c in sft)
    assert all(c[c.index("--eval-every") + 1] == "2000" and "--no-eval-at-end" in c for c in sft)  # evals: start_eval's
    assert all(c[c.index("--total-iterations") + 1] == "0" and c[c.index("--eval-episodes") + 1] == "100"
               for c in evals)
    start = tmp_path / "runs" / "libero_object_0-3__sft_n20_s2000__1" / "final"
    assert evals[0][evals[0].index("--init") + 1] == f"sft:{start}"
    assert not (tmp_path / "out").exists()  # no table: no RL run was made
    assert all("--resume" not in c for c in calls)
    calls.clear()
    pirl.main(pirl.Args(**args))
    assert calls == []
    # a start killed after a checkpoint goes on from it (the SFT script refuses to start over a checkpoint)
    interrupted = tmp_path / "runs" / "libero_object_0-3__sft_n20_s2000__3"
    (interrupted / "checkpoint").mkdir(parents=True)
    pirl.main(pirl.Args(**{**args, "seeds": [1, 3]}))
    assert len(calls) == 2 and calls[0][calls[0].index("--seed") + 1] == "3" and "--resume" in calls[0]
    # the start's eval runs the first chosen algorithm's script (its --rl-flags need not suit the other one)
    calls.clear()
    pirl.main(pirl.Args(**{**args, "seeds": [4], "algorithms": ["flow_noise"], "rl_flags": "--noise-std-max 0.2"}))
    assert [Path(c[1]).name for c in calls] == ["sft_pi0.py", "flow_noise_pi0.py"]
    assert calls[1][-4:] == ["--noise-std-max", "0.2", "--total-iterations", "0"]


def test_pirl_table_keeps_its_runs_so_another_machine_adds_a_seed_without_redoing_one(tmp_path, monkeypatch):
    """The results JSON keeps each RL run's history and the raw throughput measured beside it: a later call on a
    machine without the run directories reuses them (no SFT, no RL, its rows as measured) and runs only the new seed;
    a narrower call keeps the runs it did not ask for."""
    import benchmarks.pirl as pirl

    calls = []
    monkeypatch.setattr(pirl, "run", fake_pirl_run(calls, "libero_object_0-3"))
    monkeypatch.setattr(pirl, "raw_throughput", lambda *a, **k: 200.0)
    args = dict(env="libero", task="libero_object/0-3", minutes=8, run_dir=tmp_path / "runs",
                demo_dir=tmp_path / "demos", out_dir=tmp_path / "out")
    pirl.main(pirl.Args(seeds=[1], **args))
    assert len(calls) == 4  # SFT, Flow-SDE, the start's eval, Flow-Noise
    monkeypatch.setattr(pirl, "raw_throughput", lambda *a, **k: 300.0)
    pirl.main(pirl.Args(seeds=[1], **args))  # the same machine again, run directories here: nothing re-measured
    table = json.loads((tmp_path / "out" / "pirl_libero.json").read_text())
    assert len(calls) == 4 and {r["raw_sps"] for r in table["runs"]} == {200.0}
    shutil.rmtree(tmp_path / "runs")  # the next sitting: another machine, no run directories
    calls.clear()
    monkeypatch.setattr(pirl, "raw_throughput", lambda *a, **k: 100.0)
    pirl.main(pirl.Args(seeds=[1, 2], **args))
    assert len(calls) == 4 and {c[c.index("--seed") + 1] for c in calls} == {"2"}
    table = json.loads((tmp_path / "out" / "pirl_libero.json").read_text())
    rows = {(r["algorithm"], r["seed"]): r for r in table["rows"]}
    assert rows["flow_sde", 1]["raw_sps"] == 200.0 and rows["flow_sde", 2]["raw_sps"] == 100.0
    assert rows["flow_noise", 1]["sps_ratio"] == pytest.approx(1000 / 480 / 200)
    assert rows["flow_sde", 1]["sft_success"] == 0.25 and rows["flow_sde", 1]["rl_success"] == 0.5
    assert rows["flow_sde", "mean"]["raw_sps"] == 150.0
    # the run's own simulator speed and training's share of it; empty for runs that did not time their envs
    assert rows["flow_sde", 1]["sim_sps"] == pytest.approx(1000 / 384) and rows["flow_sde", 2]["sim_ratio"] == 0.8
    assert rows["flow_sde", "mean"]["sim_ratio"] == pytest.approx(0.8)
    assert rows["flow_noise", 1]["sim_ratio"] is None and rows["flow_noise", "mean"]["sim_sps"] is None
    assert len(table["runs"]) == 4
    shutil.rmtree(tmp_path / "runs")
    calls.clear()
    pirl.main(pirl.Args(seeds=[2], **args))
    assert calls == []
    table = json.loads((tmp_path / "out" / "pirl_libero.json").read_text())
    assert [r["seed"] for r in table["rows"]] == [2, 2, "mean", "mean"]
    assert sorted(r["seed"] for r in table["runs"]) == [1, 1, 2, 2]


def test_pirl_rl_runs_skip_the_start_eval_and_the_table_reads_the_eval_only_run(tmp_path, monkeypatch):
    """The RL runs skip their iteration-0 eval (both scripts would evaluate the same start the same way); the table's
    SFT column is the eval-only run's, and an algorithm with flags of its own evaluates its start itself."""
    import benchmarks.pirl as pirl

    calls = []
    monkeypatch.setattr(pirl, "run", fake_pirl_run(calls, "PushCube-v1", start_rate=0.25))
    monkeypatch.setattr(pirl, "raw_throughput", lambda *a, **k: 200.0)
    args = pirl.Args(seeds=[1], minutes=8, run_dir=tmp_path / "runs", out_dir=tmp_path / "out",
                     noise_flags="--noise-std-max 0.2")
    pirl.main(args)
    names = [(Path(c[1]).name, "--no-eval-at-start" in c) for c in calls]
    assert names == [("sft_pi0.py", False), ("flow_sde_pi0.py", True), ("flow_sde_pi0.py", False),
                     ("flow_noise_pi0.py", False)]  # SFT, Flow-SDE, its start's eval-only run, Flow-Noise
    assert calls[2][calls[2].index("--total-iterations") + 1] == "0"
    rows = json.loads((tmp_path / "out" / "pirl_maniskill.json").read_text())["rows"]
    assert [(r["algorithm"], r["seed"], r["sft_success"], r["rl_success"], r["gain_points"]) for r in rows[:2]] == [
        ("flow_sde", 1, 0.25, 0.5, 25.0), ("flow_noise", 1, 0.25, 0.5, 25.0)]


def test_seed_interval_is_the_student_t_half_width():
    sys.path.insert(0, str(ROOT))
    from benchmarks.report import seed_interval

    assert seed_interval([0.5]) == 0.0
    assert abs(seed_interval([1.0, 2.0, 3.0]) - 4.303 / 3 ** 0.5) < 1e-9  # sd 1, n 3: t(2 df) = 4.303
    assert abs(seed_interval([0.0, 1.0] * 20) - 2.042 * (40 / 39) ** 0.5 * 0.5 / 40 ** 0.5) < 1e-9  # past the table
