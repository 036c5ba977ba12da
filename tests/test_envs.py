"""common/envs.py: the env factory refuses unknown envs and malformed LIBERO tasks before building anything."""

import pytest

from common.envs import check_task, make_task_env


def test_bad_env_and_task_names_are_refused():
    with pytest.raises(ValueError, match="env must be"):
        make_task_env("gym", "CartPole-v1", 1)
    for task in ("libero_object", "libero_object/x", "a/b/1"):
        with pytest.raises(ValueError, match="<suite>/<task id>"):
            check_task("libero", task)
    check_task("libero", "libero_object/3")
    check_task("maniskill", "PushCube-v1")
