"""common.maniskill_demos: motion planning in the numpy-1 child process, replay in our wrapper, the demo format, and
the child's crash and deadline handling (faults injected through the test-only `_MANISKILL_DEMOS_FAULT`)."""

import json
import shutil

import numpy as np
import pytest

from common import maniskill_demos
from common.demos import GENERATING, load_demos
from common.maniskill_demos import generate_demos
from common.maniskill_env import ManiSkillSingle

OFFSET = 1_000_000


@pytest.fixture(scope="module")
def pushcube_demos(tmp_path_factory):
    """3 PushCube demos, with the child segfaulting on the second seed: reported, restarted, and the seed skipped."""
    out = tmp_path_factory.mktemp("demos") / "PushCube-v1"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("_MANISKILL_DEMOS_FAULT", f"{OFFSET + 1}:crash")
        report = generate_demos("PushCube-v1", 3, out, progress=False)
    return out, report


def test_report(pushcube_demos):
    out, report = pushcube_demos
    assert report["complete"] and report["stored"] == 3 and report["attempts"] == 4 and report["crashes"] == 1
    assert report["planner_successes"] == 3 and report["replay_successes"] == 3 and report["diverged"] == 0
    assert report["replay_success_rate"] == 1.0 and report["planner_success_rate"] == 0.75
    assert any("SIGSEGV" in line and str(OFFSET + 1) in line for line in report["failures"])
    assert 30 <= report["length_min"] <= report["length_mean"] <= report["length_max"] <= 100
    assert json.loads((out / "report.json").read_text()) == report


def test_stored_episodes_match_a_replay_in_our_wrapper(pushcube_demos):
    out, _ = pushcube_demos
    episodes = load_demos(out)
    assert [e["meta"]["reset_id"] for e in episodes] == [OFFSET, OFFSET + 2, OFFSET + 3]
    env = ManiSkillSingle("PushCube-v1", "state", "pd_joint_pos", "sparse", 128)
    try:
        for ep in episodes:
            meta, actions, states = ep["meta"], ep["actions"], ep["obs"]["state"]
            T = len(actions)
            assert actions.shape == (T, 8) and actions.dtype == np.float32 and states.shape == (T + 1, 35)
            assert meta == dict(source="maniskill_motionplanning", env="maniskill", task="PushCube-v1",
                                task_description="push cube", reset_id=meta["reset_id"], success=True,
                                control_mode="pd_joint_pos", planner_success=True, length=T)
            np.testing.assert_array_equal(env.reset(meta["reset_id"])["state"], states[0])
            for t, action in enumerate(actions):
                obs, _, _, success = env.step(action)
                if t in (0, T // 2, T - 1):
                    np.testing.assert_array_equal(obs["state"], states[t + 1])
                assert success == (t == T - 1)  # cut right after the first success step
    finally:
        env.close()
    from common.replay_buffer import ReplayBuffer

    buf = ReplayBuffer.open(out, readonly=True, cache_transitions=0, eviction="keep")
    seg = buf.read_segment(buf.ids[0])
    assert seg["terminated"][-1] and not seg["terminated"][:-1].any() and seg["rewards"][-1] == 1.0


def test_an_interrupted_generation_goes_on_without_duplicates(pushcube_demos, tmp_path):
    """A copy of the dataset as a generation killed before its report leaves it: run again for the same count it tries
    no seed; asked for one more, it tries the seed that crashed before and stores it, and no stored seed twice."""
    src, _ = pushcube_demos
    out = tmp_path / "PushCube-v1"
    shutil.copytree(src, out)
    (out / "report.json").unlink()
    (out / GENERATING).write_text("{}")
    report = generate_demos("PushCube-v1", 3, out, progress=False)
    assert report["attempts"] == 0 and report["stored"] == report["stored_before"] == 3 and report["complete"]
    assert not (out / GENERATING).exists()
    report = generate_demos("PushCube-v1", 4, out, progress=False)
    assert report["attempts"] == 1 and report["stored"] == 4 and report["stored_before"] == 3
    assert [e["meta"]["reset_id"] for e in load_demos(out)] == [OFFSET, OFFSET + 2, OFFSET + 3, OFFSET + 1]


def test_hung_planner_is_killed_at_its_deadline(tmp_path, monkeypatch):
    monkeypatch.setenv("_MANISKILL_DEMOS_FAULT", f"{OFFSET}:hang")
    report = generate_demos("PushCube-v1", 1, tmp_path / "d", timeout=3, progress=False)
    assert report["crashes"] == 1 and report["stored"] == 1 and "deadline" in report["failures"][0]


def test_task_without_a_solution(tmp_path):
    with pytest.raises(ValueError, match=r"no motion-planning solution for 'PushT-v1'.*PickCube-v1.*PushCube-v1"):
        generate_demos("PushT-v1", 1, tmp_path)


def test_missing_numpy1_dir_names_the_setup_command(tmp_path, monkeypatch):
    monkeypatch.setattr(maniskill_demos, "NUMPY1_DIR", tmp_path / "numpy1")
    with pytest.raises(FileNotFoundError, match=r"numpy1 is missing.*bash scripts/setup.sh"):
        generate_demos("PushCube-v1", 1, tmp_path / "out")


def test_ensure_demos_finishes_an_interrupted_generation_and_keeps_a_finished_or_hand_made_one(tmp_path, monkeypatch):
    from common.demos import ensure_demos, episode_segment, open_demo_writer

    calls = []
    monkeypatch.setattr(maniskill_demos, "generate_demos", lambda task, n, out, **kw: calls.append((task, n, out)))
    out = tmp_path / "d"
    writer = open_demo_writer(out)  # a dataset made by hand (no report, no mark): used as it is
    writer.add(episode_segment([{"state": np.zeros(3)}] * 3, [np.zeros(2)] * 2, 1),
               dict(source="synthetic", env="maniskill", task="PushCube-v1", reset_id=7, success=True))
    del writer
    assert ensure_demos("maniskill", "PushCube-v1", 3, out) == out and calls == []
    (out / GENERATING).write_text("{}")  # a generator was killed while filling it
    assert ensure_demos("maniskill", "PushCube-v1", 3, out) == out and calls == [("PushCube-v1", 3, out)]
    assert ensure_demos("maniskill", "PushCube-v1", 3, tmp_path / "new") == tmp_path / "new" and len(calls) == 2
    # a finished generation of 1 demo, asked for 3: topped up (the generator goes on from the seeds it holds);
    # the same with other observations is left alone, for the caller to refuse
    (out / GENERATING).unlink()
    (out / "report.json").write_text(json.dumps({"task": "PushCube-v1", "obs_mode": "state", "image_size": 64}))
    assert ensure_demos("maniskill", "PushCube-v1", 1, out) == out and len(calls) == 2
    assert ensure_demos("maniskill", "PushCube-v1", 3, out) == out and calls[2] == ("PushCube-v1", 3, out)
    assert ensure_demos("maniskill", "PushCube-v1", 3, out, obs_mode="rgb") == out and len(calls) == 3
