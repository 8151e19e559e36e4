"""`planner.serve`, the LeRobot async-inference server planning with wmctl, and `planner.safety`: clamps, holds
and their counts; loopback-only binding; the allow-listed unpickler; the protocol as LeRobot's client speaks it;
and end to end, LeRobot's unmodified `RobotClient` driving Meta-World reach to its goal through the server (which
is then sent malformed payloads, a new goal, and killed)."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import threading
import time

import numpy as np
import pytest
from packaging.version import Version

lerobot = pytest.importorskip("lerobot")
if Version(lerobot.__version__) < Version("0.6"):
    pytest.skip("the server is built on lerobot 0.6 (the Python 3.12 stack)", allow_module_level=True)

import grpc  # noqa: E402
from lerobot.async_inference.helpers import RemotePolicyConfig, TimedObservation  # noqa: E402
from lerobot.transport import services_pb2, services_pb2_grpc  # noqa: E402
from lerobot.transport.utils import send_bytes_in_chunks  # noqa: E402
from lerobot.utils.feature_utils import hw_to_dataset_features  # noqa: E402
from lerobot_sim_robot import KEYS, STATE_NAMES, make_reach_server  # noqa: E402

from pipeline.stage import UserError  # noqa: E402
from planner.cem import CEMConfig  # noqa: E402
from planner.latent_mpc import Goal, GoalSpec  # noqa: E402
from planner.safety import SafetyConfig, SafetyGuard, dataset_ranges  # noqa: E402
from planner.serve import PayloadError, ServeConfig, safe_loads  # noqa: E402

BOX = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def test_an_out_of_box_plan_is_clipped_to_the_workspace_and_counted():
    guard = SafetyGuard(SafetyConfig(delta_scale=0.1, workspace_low=BOX[0], workspace_high=BOX[1]))
    state = np.array([0.9, 0.5, 0.5, 1.0])
    chunk = np.tile([1.0, 0.0, 0.0, 0.3], (4, 1))  # +0.1 m in x per step: out of the box after the first
    safe = guard.filter_chunk(chunk, state)
    x = state[0] + 0.1 * np.cumsum(safe[:, 0])
    assert np.allclose(x, [1.0, 1.0, 1.0, 1.0]) and np.allclose(safe[:, 0], [1.0, 0.0, 0.0, 0.0])
    assert np.allclose(safe[:, 3], 0.3)  # the gripper is not a position: untouched
    r = guard.report.as_dict()
    assert r["clip_workspace"] == 3 and r["chunks"] == 1 and r["actions"] == 4
    assert "clip_workspace 3" in guard.report.summary()
    inside = guard.filter_chunk(np.tile([-1.0, 0.0, 0.0, 0.0], (2, 1)), state)  # back into the box: allowed
    assert np.allclose(inside[:, 0], -1.0) and guard.report.counts["clip_workspace"] == 3


def test_step_chunk_and_action_clamps_for_delta_and_absolute_actions():
    guard = SafetyGuard(SafetyConfig(delta_scale=1.0, action_low=(-1.0,) * 3, action_high=(1.0,) * 3,
                                     max_step_change=(0.5, 0.5, 0.5), max_chunk_travel=1.0, position_dims=(0, 1),
                                     state_dims=(0, 1)))
    safe = guard.filter_chunk(np.array([[3.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]), np.zeros(2),
                              previous_A=np.zeros(3))
    assert np.allclose(safe[:, 0], [0.5, 0.5, 0.0])  # bound 1, ramp 0.5 per step, 1 m travelled
    c = guard.report.counts
    assert c["clip_action"] == 1 and c["clip_step"] == 1 and c["clip_chunk"] == 2  # steps 2 and 3 cut
    absolute = SafetyGuard(SafetyConfig(action_kind="absolute", position_dims=(0, 1), state_dims=(0, 1),
                                        workspace_low=(0.0, 0.0), workspace_high=(512.0, 512.0),
                                        max_step_change=(20.0, 20.0)))
    safe = absolute.filter_chunk(np.array([[600.0, 100.0], [700.0, 100.0]]), np.array([500.0, 100.0]),
                                 previous_A=np.array([500.0, 100.0]))
    assert np.allclose(safe, [[512.0, 100.0], [512.0, 100.0]])  # 20 px steps, then the box's edge
    assert absolute.report.counts["clip_step"] == 2 and absolute.report.counts["clip_workspace"] == 2
    off = SafetyGuard(SafetyConfig(enabled=False, workspace_low=BOX[0], workspace_high=BOX[1]))
    assert np.array_equal(off.filter_chunk(np.full((2, 4), 9.0), np.zeros(4)), np.full((2, 4), 9.0))


def test_a_missed_deadline_or_silence_holds_and_is_counted():
    guard = SafetyGuard(SafetyConfig(deadline_s=0.05))
    assert guard.missed_deadline(0.06) and not guard.missed_deadline(0.04)
    hold = guard.hold(3, np.array([0.1, 0.6, 0.2, 0.9]), np.array([0.4, -0.2, 0.1, 0.7]), reason="deadline",
                      action_dim=4)
    assert np.allclose(hold, [[0.0, 0.0, 0.0, 0.7]] * 3)  # zero displacement, the gripper as last sent
    absolute = SafetyGuard(SafetyConfig(action_kind="absolute", position_dims=(0, 1), state_dims=(0, 1)))
    assert np.allclose(absolute.hold(1, np.array([120.0, 80.0]), None, reason="timeout", action_dim=2), [[120, 80]])
    assert guard.report.counts["hold_deadline"] == 3 and absolute.report.counts["hold_timeout"] == 1
    with pytest.raises(UserError, match="--action-kind"):
        SafetyConfig(action_kind="velocity")
    with pytest.raises(UserError, match="workspace"):
        SafetyConfig(workspace_low=(0.0,))


def test_bounds_default_to_the_datasets_recorded_ranges(pusht_root):
    import pandas as pd

    ranges = dataset_ranges(pusht_root)
    table = pd.concat(pd.read_parquet(p) for p in sorted(pusht_root.glob("data/*/*.parquet")))
    state = np.stack(table["observation.state"].to_numpy())
    assert np.allclose(ranges["observation.state"][0], state.min(0), atol=1e-3)
    assert np.allclose(ranges["observation.state"][1], state.max(0), atol=1e-3)
    guard = SafetyGuard.from_dataset(SafetyConfig(action_kind="absolute", position_dims=(0, 1), state_dims=(0, 1),
                                                  workspace_margin=5.0), pusht_root)
    assert np.allclose(guard.workspace[0], state.min(0) - 5.0, atol=1e-3)
    assert np.allclose(guard.action_bounds[1], np.stack(table["action"].to_numpy()).max(0), atol=1e-3)
    with pytest.raises(UserError, match="--state-dims"):
        SafetyGuard.from_dataset(SafetyConfig(), pusht_root)  # pusht records 2 state dimensions, not 3


def test_binding_beyond_loopback_needs_allow_remote_and_names_the_pickle_risk():
    for host in ("0.0.0.0", "192.168.1.10", "example.org"):
        with pytest.raises(UserError, match="pickle.*--allow-remote"):
            ServeConfig(host=host)
    ServeConfig(host="0.0.0.0", allow_remote=True)
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        ServeConfig(host=host)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch wmctl-pwned",))


def test_only_lerobots_payload_classes_are_unpickled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    obs = TimedObservation(timestamp=1.0, timestep=3, observation={"x.pos": np.float64(0.5),
                                                                   "cam": np.zeros((2, 2, 3), np.uint8)})
    back = safe_loads(pickle.dumps(obs), TimedObservation, max_bytes=2**20)
    assert back.timestep == 3 and back.observation["cam"].shape == (2, 2, 3)
    for payload, match in [(pickle.dumps(_Evil()), "refused a pickled .*system"), (b"garbage", "not a valid pickle"),
                           (pickle.dumps({"a": 1}), "expected a TimedObservation"), (b"x" * 100, "over the")]:
        with pytest.raises(PayloadError, match=match):
            safe_loads(payload, TimedObservation, max_bytes=50 if match == "over the" else 2**20)
    assert not (tmp_path / "wmctl-pwned").exists()


def _features() -> dict:
    cam = (64, 64, 3)
    return hw_to_dataset_features({**dict.fromkeys(STATE_NAMES, float), "exterior": cam, "wrist": cam},
                                  "observation", use_video=False)


def _observation(t: int, eef=(0.0, 0.6, 0.2)) -> TimedObservation:
    raw = {**dict(zip(STATE_NAMES, [*eef, 1.0])), "exterior": np.zeros((64, 64, 3), np.uint8),
           "wrist": np.zeros((64, 64, 3), np.uint8)}
    return TimedObservation(timestamp=time.time(), timestep=t, observation=raw)


def _send(stub, obs) -> None:
    stub.SendObservations(send_bytes_in_chunks(pickle.dumps(obs), services_pb2.Observation))


def _instructions(stub, path: str = "reach-model", policy_type: str = "wmctl", features=None) -> None:
    cfg = RemotePolicyConfig(policy_type, path, _features() if features is None else features, 8)
    stub.SendPolicyInstructions(services_pb2.PolicySetup(data=pickle.dumps(cfg)))


def _goal(xyz) -> Goal:
    return Goal(np.zeros((2, 64, 64, 3), np.uint8), np.array([*xyz, 1.0]))


def _refused(call, match: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and match in e.value.details(), e.value.details()


def test_the_protocol_plans_on_the_latest_observation_refuses_bad_payloads_and_holds(tmp_path):
    handle = make_reach_server(_goal((0.1, 0.6, 0.2)), deadline_s=None, obs_timeout_s=0.5)
    server = handle.servicer
    channel = grpc.insecure_channel(f"127.0.0.1:{handle.port}")
    stub = services_pb2_grpc.AsyncInferenceStub(channel)
    try:
        stub.Ready(services_pb2.Empty())
        _refused(lambda: _instructions(stub, policy_type="act"), "--policy_type=wmctl")
        _refused(lambda: _instructions(stub, path="/runs/other"), "this server serves reach-model")
        _refused(lambda: _instructions(stub, features={"observation.state": _features()["observation.state"]}),
                 "not the run's cameras")
        _instructions(stub)
        for t in (0, 1, 2):  # only the latest is planned on
            _send(stub, _observation(t))
        chunk = pickle.loads(stub.GetActions(services_pb2.Empty()).data)
        assert [a.get_timestep() for a in chunk] == [3, 4, 5, 6]  # execute 4 frames of frameskip 1, after t=2
        assert chunk[0].get_action().shape == (4,) and float(chunk[0].get_action()[0]) > 0  # towards +x
        assert server.stats["dropped_stale"] == 2 and server.stats["chunks"] == 1
        _refused(lambda: stub.SendObservations(iter([services_pb2.Observation(
            transfer_state=services_pb2.TRANSFER_END, data=pickle.dumps(_Evil()))])), "refused a pickled")
        _refused(lambda: stub.SendObservations(send_bytes_in_chunks(b"\x80\x05garbage", services_pb2.Observation)),
                 "not a valid pickle")
        _refused(lambda: stub.SendPolicyInstructions(services_pb2.PolicySetup(data=b"junk")), "not a valid pickle")
        _send(stub, TimedObservation(timestamp=time.time(), timestep=4, observation={"x.pos": 0.0}))
        _refused(lambda: stub.GetActions(services_pb2.Empty()), "does not match the robot's features")
        calls = []
        real_plan = server.mpc.plan
        server.mpc.plan = lambda *a, **kw: calls.append(kw["shift"]) or real_plan(*a, **kw)
        _send(stub, _observation(6, eef=(0.05, 0.6, 0.2)))  # still serving after every refusal
        chunk = pickle.loads(stub.GetActions(services_pb2.Empty()).data)
        assert chunk[0].get_timestep() == 7 and calls == [4]  # warm start: the 4 frames executed since t=2
        server.safety.cfg = SafetyConfig(deadline_s=1e-9, obs_timeout_s=0.5)  # every plan now misses it
        _send(stub, _observation(7))
        chunk = pickle.loads(stub.GetActions(services_pb2.Empty()).data)
        assert all(float(a.get_action()[:3].abs().max()) == 0.0 for a in chunk)  # a hold, not the plan
        time.sleep(0.6)  # silence: a hold after the last action sent
        hold = pickle.loads(stub.GetActions(services_pb2.Empty()).data)
        assert hold[0].get_timestep() == 12 and float(hold[0].get_action()[:3].abs().max()) == 0.0
        rep = server.report()
        assert rep["safety"]["hold_deadline"] == 4 and rep["safety"]["hold_timeout"] == 1
        assert rep["refused"] == 7 and rep["holds"] == 2 and rep["latency_s"]["p50"] > 0
        goal_file = tmp_path / "goal.png"
        from PIL import Image

        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(goal_file)
        spec = GoalSpec(images=(goal_file, goal_file), state=(-0.2, 0.6, 0.2, 1.0))
        _instructions(stub, path=spec.to_uri())  # a new goal over the protocol
        assert np.allclose(server.mpc.goal_NZ[1, :3].numpy(), [-2.0, 6.0, 2.0])
    finally:
        channel.close()
        handle.stop()


def _chunk(stub) -> list:
    data = stub.GetActions(services_pb2.Empty()).data
    return pickle.loads(data) if data else []


@contextlib.contextmanager
def _session(handle):
    """A client session on a started server (Ready, then the policy instructions): its stub."""
    channel = grpc.insecure_channel(f"127.0.0.1:{handle.port}")
    stub = services_pb2_grpc.AsyncInferenceStub(channel)
    try:
        stub.Ready(services_pb2.Empty())
        _instructions(stub)
        yield stub
    finally:
        channel.close()
        handle.stop()


def test_an_observation_already_planned_from_is_skipped_unless_the_queue_is_empty_or_the_chunk_was_lost():
    """An observation at the timestep the last plan started from (nothing ran since: the same state) would only
    delay the next useful plan: skipped, and counted, unless the client's queue is empty (`must_go`) or the last
    chunk has had the time to run (4 actions at 4 Hz, and a tick) and the robot is still there (the chunk was
    lost)."""
    handle = make_reach_server(_goal((0.1, 0.6, 0.2)), fps=4.0)
    server = handle.servicer
    with _session(handle) as stub:
        _send(stub, _observation(0))
        assert [a.get_timestep() for a in _chunk(stub)] == [1, 2, 3, 4]
        _send(stub, _observation(0))  # captured before the chunk's first action ran
        assert _chunk(stub) == [] and server.stats["skipped_planned"] == 1 and server.stats["chunks"] == 1
        must = _observation(0)
        must.must_go = True  # the client's queue is empty: it must be answered
        _send(stub, must)
        assert [a.get_timestep() for a in _chunk(stub)] == [1, 2, 3, 4] and server.stats["chunks"] == 2
        _send(stub, _observation(1))  # an action ran: a new state
        assert _chunk(stub)[0].get_timestep() == 2 and server.stats["skipped_planned"] == 1
        time.sleep(1.3)  # the chunk's 4 actions at 4 Hz (and one more tick) have had the time to run
        _send(stub, _observation(1))  # and the robot is still at timestep 1: that chunk was lost
        assert _chunk(stub)[0].get_timestep() == 2 and server.stats["skipped_planned"] == 1


def test_plan_ahead_resends_the_queued_actions_and_plans_from_the_predicted_state_after_them():
    """--plan-ahead: the actions already sent that will run while the plan is computed (median latency x fps)
    head the new chunk unchanged, and the plan starts from the model's prediction after them (here the analytic
    model: the end effector moved by those actions), warm-started by the frames up to its own start."""
    from lerobot_sim_robot import EEF_SCALE, STEP_M

    handle = make_reach_server(_goal((0.3, 0.6, 0.2)), fps=1000.0, plan_ahead=True)
    server = handle.servicer
    server.safety = SafetyGuard(SafetyConfig(enabled=False))  # the actions sent are the plan's, unclamped
    with _session(handle) as stub:
        _send(stub, _observation(0))
        first = _chunk(stub)
        assert [a.get_timestep() for a in first] == [1, 2, 3, 4]  # no latency known yet: nothing ahead
        server.latencies[:] = [0.0025]  # 2.5 ms at 1000 Hz: 3 actions run while the next plan is computed
        contexts, shifts = [], []
        real_plan = server.mpc.plan
        server.mpc.plan = lambda ctx, *a, **kw: contexts.append(ctx) or shifts.append(kw["shift"]) or \
            real_plan(ctx, *a, **kw)
        _send(stub, _observation(1))  # the chunk's first action ran
        second = _chunk(stub)
        assert [a.get_timestep() for a in second] == [2, 3, 4, 5, 6, 7, 8]
        for old, new in zip(first[1:], second[:3]):  # the queued ones, resent unchanged
            assert np.array_equal(old.get_action().numpy(), new.get_action().numpy())
        moved = sum(a.get_action().numpy()[:3] for a in first[1:]) * STEP_M * EEF_SCALE
        expected = np.array([0.0, 0.6, 0.2]) * EEF_SCALE + moved
        assert np.allclose(contexts[0][0, 1, :3].numpy(), expected, atol=1e-5)  # the predicted state
        assert shifts == [4]  # the new plan starts after timestep 4; the first started after 0


def _wait_until(cond, timeout: float, every: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(every)
    return cond()


def _goal_spec(folder, name: str, images: np.ndarray, state: np.ndarray) -> GoalSpec:
    from PIL import Image

    files = []
    for key, img in zip(KEYS, images):
        files.append(folder / f"{name}-{key.rsplit('.', 1)[-1]}.png")
        Image.fromarray(img).save(files[-1])
    return GoalSpec(images=tuple(files), state=tuple(float(x) for x in state))


def _reach_goals(folder) -> tuple[GoalSpec, np.ndarray, GoalSpec, np.ndarray]:
    """Goal A: where Meta-World's scripted policy takes the arm towards variation 0's target; goal B: the start."""
    from pipeline.sims.metaworld import MetaWorldSim

    sim = MetaWorldSim("reach", 64, fps=20, camera_keys=KEYS)
    try:
        start_images, start = sim.new_episode(0), sim.robot_state()
        for _ in range(40):
            images = sim.step(sim.scripted_action())
        goal = sim.robot_state()
    finally:
        sim.close()
    assert np.linalg.norm(goal[:3] - start[:3]) > 0.1  # a real reach
    return (_goal_spec(folder, "a", images, goal), goal[:3], _goal_spec(folder, "b", start_images, start),
            start[:3])


def _start_client(port: int, folder):
    """LeRobot's RobotClient for the Meta-World reach robot, started, its receiver and control loop running."""
    from lerobot.async_inference.configs import RobotClientConfig
    from lerobot.async_inference.robot_client import RobotClient
    from lerobot_sim_robot import MetaworldReachConfig

    client = RobotClient(RobotClientConfig(
        policy_type="wmctl", pretrained_name_or_path="reach-model", actions_per_chunk=8, fps=20,
        robot=MetaworldReachConfig(id="sim", calibration_dir=folder / "calibration"),
        server_address=f"127.0.0.1:{port}", chunk_size_threshold=0.5, aggregate_fn_name="latest_only"))
    assert client.start()
    threads = [threading.Thread(target=client.receive_actions, daemon=True),
               threading.Thread(target=client.control_loop, kwargs={"task": ""}, daemon=True)]
    for th in threads:
        th.start()
    return client, threads


def _dist(robot, xyz) -> float:
    return float(np.linalg.norm(robot.position() - xyz))


@pytest.mark.slow
def test_lerobots_robot_client_reaches_the_goal_through_the_server_and_holds_when_it_dies(tmp_path, monkeypatch):
    """LeRobot's unmodified RobotClient, with Meta-World reach registered as a LeRobot robot, connects to the
    server (a separate process planning with an analytic world model of the end effector), streams observations
    and executes chunks while the next is planned: the arm reaches the goal (Meta-World's 5 cm). Malformed payloads
    are refused while it serves; a new goal sent over the protocol turns the arm; then the server is killed
    (SIGKILL): the client's threads go on without raising, and once its queue is spent the arm holds still."""
    import multiprocessing as mp
    import signal

    from lerobot_sim_robot import serve_in_process

    spec_a, goal_a, spec_b, goal_b = _reach_goals(tmp_path)
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    proc = ctx.Process(target=serve_in_process, args=(spec_a.to_uri(), ports), daemon=True)
    proc.start()
    client, channel, threads, errors = None, None, [], []
    try:
        port = ports.get(timeout=180)
        monkeypatch.chdir(tmp_path)  # LeRobot's client writes its log file into ./logs
        monkeypatch.setattr(threading, "excepthook", errors.append)
        client, threads = _start_client(port, tmp_path)
        robot = client.robot
        assert _wait_until(lambda: robot.position() is not None, 60)
        start_dist = _dist(robot, goal_a)
        assert _wait_until(lambda: _dist(robot, goal_a) < 0.05, 60), robot.position()  # reached
        assert start_dist > 0.1 and 0 < robot.actions_sent < 200

        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = services_pb2_grpc.AsyncInferenceStub(channel)
        _refused(lambda: stub.SendObservations(send_bytes_in_chunks(pickle.dumps(_Evil()), services_pb2.Observation)),
                 "refused a pickled")
        _refused(lambda: stub.SendPolicyInstructions(services_pb2.PolicySetup(data=b"\x00junk")), "not a valid")
        stub.SendPolicyInstructions(services_pb2.PolicySetup(data=pickle.dumps(RemotePolicyConfig(
            "wmctl", spec_b.to_uri(), client.policy_config.lerobot_features, 8))))
        to_b = _dist(robot, goal_b)
        assert _wait_until(lambda: _dist(robot, goal_b) < to_b - 0.04, 30)  # still serving: turned to goal B

        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        # the client's queue drains (between observation sends that now block on gRPC's retries), then it has
        # nothing more to send the robot
        assert _wait_until(lambda: not client.actions_available(), 30)
        time.sleep(0.2)  # an action popped just before may still be executing
        p0, n0 = robot.position(), robot.actions_sent
        time.sleep(1.0)
        assert robot.actions_sent == n0 and np.array_equal(robot.position(), p0)  # the arm holds still
        assert all(th.is_alive() for th in threads) and not errors  # the client lives on; nothing escaped
        assert not (tmp_path / "wmctl-pwned").exists()
    finally:
        if channel is not None:
            channel.close()
        if client is not None:
            client.stop()
            for th in threads:
                th.join(10)  # both loops end on the client's shutdown event
            client.robot.close_sim()
        if proc.is_alive():
            proc.kill()


def test_a_server_built_from_a_trained_run_plans_safe_chunks_and_the_command_serves(tiny_run):
    """The real path: a tiny trained pusht run and its encoder, gym-pusht's goal, the dataset's ranges as bounds;
    a client whose camera is named otherwise maps it with rename_map."""
    from typer.testing import CliRunner

    from pipeline.cli import app  # as mounted: `wmctl robot serve`
    from planner.latent_mpc import MPCConfig
    from planner.serve import ServerHandle, ServeRunConfig, build_server

    cfg = ServeRunConfig(run=tiny_run, goal=GoalSpec(pusht=True), serve=ServeConfig(port=0),
                         mpc=MPCConfig(horizon=2, execute=2, context=1, k=2,
                                       cem=CEMConfig(samples=8, elites=2, iterations=1)),
                         safety=SafetyConfig(action_kind="absolute", position_dims=(0, 1), state_dims=(0, 1)))
    server = build_server(cfg)
    lo, hi = server.safety.action_bounds
    handle = ServerHandle(server, cfg.serve)
    channel = grpc.insecure_channel(f"127.0.0.1:{handle.port}")
    stub = services_pb2_grpc.AsyncInferenceStub(channel)
    try:
        stub.Ready(services_pb2.Empty())
        features = hw_to_dataset_features({"x": float, "y": float, "top": (96, 96, 3)}, "observation",
                                          use_video=False)
        spec = RemotePolicyConfig("wmctl", str(tiny_run), features, 10,
                                  rename_map={"observation.images.top": "observation.image"})
        stub.SendPolicyInstructions(services_pb2.PolicySetup(data=pickle.dumps(spec)))
        obs = {"x": 200.0, "y": 300.0, "top": np.full((96, 96, 3), 240, np.uint8)}
        _send(stub, TimedObservation(timestamp=time.time(), timestep=5, observation=obs))
        chunk = pickle.loads(stub.GetActions(services_pb2.Empty()).data)
        assert [a.get_timestep() for a in chunk] == [6, 7]
        acts = np.stack([a.get_action().numpy() for a in chunk])
        assert ((acts >= lo - 1e-4) & (acts <= hi + 1e-4)).all()  # within the recorded action range
        assert server.report()["plans"] == 1
    finally:
        channel.close()
        handle.stop()
    r = CliRunner().invoke(app, ["robot", "serve", "--run", str(tiny_run), "--goal-pusht", "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "pickles" in r.output and "--allow-remote" in r.output
    r = CliRunner().invoke(app, ["robot", "serve", "--run", str(tiny_run), "--goal-pusht", "--action-kind", "absolute",
                                 "--position-dims", "0,1", "--state-dims", "0,1", "--port", "0", "--duration", "0.3",
                                 "--samples", "8", "--elites", "2", "--iterations", "1"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.rindex('{"observations"'):])  # after transformers' progress bars
    assert report["chunks"] == 0 and report["safety"]["chunks"] == 0
