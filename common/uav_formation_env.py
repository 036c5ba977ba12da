"""A batched 3-D multi-UAV formation environment with static columns and thrown balls (torch; CPU or CUDA).

Our CPU stand-in for the OmniDrones / Isaac Sim scenario of Xie et al., "Multi-UAV Formation Control with Static and
Dynamic Obstacle Avoidance via Reinforcement Learning" (arXiv 2410.18495), with the released code's constants:
N drones (3 in a triangle of radius 1 m) spawn with their centre at (0, 0, 1.5) and should fly at v* = (0, 2, 0) m/s
at 1.5 m, heading +x, through a corridor of vertical columns (radius 0.15 m on a zig-zag grid of 0.5 m cells, so the
narrowest gaps are 0.2 m) while balls (radius 0.15 m) are thrown ballistically at the formation; dt = 0.02 s, 900 steps.

Dynamics: `ctbr` (collective thrust and body rates, the paper's action: u = tanh(a), body-rate targets u[:3]·π rad/s
and thrust clamp((u[3] + 1) / 2, 0, 0.9), first-order rate and thrust lags, rotation by Rodrigues' formula, linear
drag) or `pointmass` (u[:3]·3 m/s is a velocity target with a 0.1 s lag; fast, for tests and debugging).

Step API (all tensors on `device`, E envs, N agents; auto-reset: a finished env restarts and `info` says so):
    obs = env.reset()
    obs, reward, terminated, truncated, info = env.step(actions)      # actions [E, N, 4]
    obs:    self [E, N, Ds], others [E, N, N-1, 7], balls [E, N, B, 10] + ball_mask [E, N, B] (True = ignore),
            static [E, N, 1, 9] (sdf9: min distance from a 3x3 grid of ±0.1 m around the drone to the column axes;
            sdf9_diff: the same nine as the centre's distance and the others' differences from it / 0.1, see
            `sdf9_diff`) or [E, N, S, 10] (tokens) + static_mask, state [E, Dg] (everything, for a centralised critic)
    reward: [E, N, 4] = (formation, obstacle, forward, smoothness), the released code's terms; the script scalarises
    info:   done [E], bad (crash / too close / hit), hit_ball, hit_column, hit_wall, crash, too_close, and for finished
            episodes
            `episode` = {collision_free, formation_error (m, time-mean), laplacian_cost, arrival, success,
            returns [E, 4] (γ-discounted per objective), smoothness (mean |Δa|), length, left_corridor (the
            formation centroid went past |x| = grid_border at some step: round the column field, not through it)}
Presets: free (no obstacles), static (10 columns), dynamic (2 balls), mixed (10 + 2); every field can be overridden.

Side walls (`corridor_walls` > 0, off by default): the spec's corridor is 4 m wide, but the release has no walls and a
policy may go round the column field (`left_corridor`). With walls at |x| = corridor_walls a drone that reaches one
ends the episode like a column hit (-20 and the terminal -10), and the obstacle reward gets a column-like term within
0.4 m of a wall. The self token's absolute x is how the policy sees them (so with walls, `relative_self_pos` makes
only y relative: a policy flying 32 m down the corridor otherwise sees an input 8x what it started with).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

G = 9.81
PRESETS = {"free": dict(num_columns=0, num_balls=0), "static": dict(num_columns=10, num_balls=0),
           "dynamic": dict(num_columns=0, num_balls=2), "mixed": dict(num_columns=10, num_balls=2)}
OBJECTIVES = ("formation", "obstacle", "forward", "smoothness")
END_CAUSES = ("crash", "too_close", "hit_column", "hit_ball", "hit_wall")  # the events that end an episode early
FORMATION_REWARDS = ("simple", "release", "release_slot")
# release_slot: each drone earns 5 c / (1 + (e_i / SLOT_SCALE)^2) on top of the release's terms, e_i its distance (m)
# from its slot about the centroid (c: 0.2 while a ball flies, as for every formation term): half the term at 0.2 m
SLOT_SCALE = 0.2


@dataclass
class FormationConfig:
    num_envs: int = 256
    num_drones: int = 3
    formation_radius: float = 1.0
    formation: str = "polygon"  # polygon (triangle for 3), line
    dynamics: str = "ctbr"
    dt: float = 0.02
    max_steps: int = 900
    target_vel: tuple = (0.0, 2.0, 0.0)
    target_height: float = 1.5
    num_columns: int = 10
    column_radius: float = 0.15
    grid_size: float = 0.5
    grid_border: float = 2.0
    static_margin: float = 2.0
    corridor_length: float = 32.0
    num_balls: int = 2
    ball_radius: float = 0.15
    throw_threshold: int = 150
    throw_time_range: int = 450
    ball_speed: tuple = (2.0, 5.0)
    time_to_hit: tuple = (0.8, 1.6)
    obs_range: float = 10.0
    static_mode: str = "sdf9"  # sdf9 (released) | sdf9_diff (the same, re-encoded: see sdf9_diff) | tokens
    static_top_k: int = 0  # tokens only: the k nearest columns in range (0: all; the release has it commented out)
    drone_radius: float = 0.0  # added to the hit distances (0: the released code's leniency)
    corridor_walls: float = 0.0  # side walls at |x| = this (m); 0: none, as released (the spec: 4 m wide, so 2.0)
    formation_reward: str = "simple"  # simple: size + 1/(1 + normalised Laplacian cost) | release: the released
    # code's rescaled terms (size + 1/(1 + un-normalised Laplacian cost), a sharp normalised-Laplacian term, and the
    # size terms again at 0.2 once every ball has flown); see `_reward_and_flags` | release_slot: the release plus a
    # per-drone slot term (a departure: every release term is blind to a turn of the formation; see SLOT_SCALE)
    full_height_reward: bool = False  # the forward reward's height term at full weight while a ball flies (the
    # release discounts it by c = 0.2 like every shaping term, so a dodge that drops towards the 0.2 m floor costs
    # little until it crashes; a departure)
    full_slot_reward: bool = False  # release_slot only: the slot term at full weight while a ball flies (c = 0.2
    # otherwise), so a dodge pays for every drone that leaves its slot about the centroid, and a rigid shift of the
    # whole formation costs nothing; a departure
    relative_self_pos: bool = False  # self token: x, y relative to the formation centroid (z stays absolute; with
    # corridor_walls only y: the walls stand at a fixed x, and the policy sees them by its absolute x)
    state_max_balls: int = 2  # the global state keeps this many ball slots and ...
    state_max_columns: int = 10  # ... column slots in every preset: one layout for the whole curriculum
    hard_safe_distance: float = 0.15
    z_limits: tuple = (0.2, 2.8)
    tau_rate: float = 0.05
    tau_thrust: float = 0.03
    hover_thrust: float = 0.45  # T at which thrust equals weight
    drag: float = 0.2
    gamma: float = 0.995  # for the per-objective discounted returns in `info["episode"]`
    formation_success_error: float = 0.3  # m, for `success`
    seed: int = 0
    device: str = "cpu"
    extra: dict = field(default_factory=dict)

    @classmethod
    def preset(cls, name: str, **overrides) -> "FormationConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return replace(cls(), **{**PRESETS[name], **overrides})


def formation_offsets(n: int, radius: float, shape: str = "polygon") -> torch.Tensor:
    """Target offsets from the centre [n, 3]; polygon: vertex 0 at +x (the paper's triangle for n = 3)."""
    if shape == "line":
        xs = torch.linspace(-radius, radius, n)
        return torch.stack([xs, torch.zeros(n), torch.zeros(n)], 1)
    if shape != "polygon":
        raise ValueError(f"formation must be polygon or line, got {shape!r}")
    ang = torch.arange(n) * 2 * math.pi / n
    return torch.stack([radius * torch.cos(ang), radius * torch.sin(ang), torch.zeros(n)], 1)


def laplacian(p: torch.Tensor, normalized: bool = True) -> torch.Tensor:
    """Graph Laplacian of the complete graph weighted by pair distances, p [..., n, 3] -> [..., n, n];
    normalised (D^-1/2 L D^-1/2): invariant to translation, rotation and scale."""
    A = torch.cdist(p, p)
    deg = A.sum(-1)
    L = torch.diag_embed(deg) - A
    if not normalized:
        return L
    s = deg.clamp(min=1e-9).rsqrt()
    return s[..., :, None] * L * s[..., None, :]


def formation_cost(p: torch.Tensor, target: torch.Tensor, normalized: bool = True) -> torch.Tensor:
    """||L(p) - L(target)||_F, p [..., n, 3], target [n, 3]."""
    return torch.linalg.matrix_norm(laplacian(p, normalized) - laplacian(target, normalized))


SDF9_SPACING = 0.1  # sdf9's grid: the drone's point and its 8 neighbours ±0.1 m away; index 4 is the drone's own


def sdf9(p_xy: torch.Tensor, columns_xy: torch.Tensor, active: torch.Tensor, far: float) -> torch.Tensor:
    """Min horizontal distance from the 3x3 grid (±0.1 m) around each drone to the column axes.
    p_xy [E, N, 2], columns_xy [E, S, 2], active [E, S] -> [E, N, 9] (far where no column is active)."""
    steps = torch.tensor([-SDF9_SPACING, 0.0, SDF9_SPACING])
    grid = torch.stack(torch.meshgrid(steps, steps, indexing="ij"), -1).reshape(9, 2).to(p_xy)
    pts = p_xy[:, :, None, :] + grid  # [E, N, 9, 2]
    d = torch.linalg.norm(pts[:, :, :, None, :] - columns_xy[:, None, None, :, :], dim=-1)  # [E, N, 9, S]
    d = torch.where(active[:, None, None, :], d, torch.full_like(d, far))
    return d.min(-1).values if d.shape[-1] else torch.full(pts.shape[:-1], far, device=p_xy.device)


def sdf9_diff(d: torch.Tensor) -> torch.Tensor:
    """sdf9's nine distances [..., 9] re-encoded as [the drone's own, then each neighbour's minus it, / 0.1]: the
    same information (invertible), but which side the nearest column is on at unit scale. In sdf9 that is a few
    centimetres' difference between metre-sized values (a column 1.5 m ahead, 0.1 m off the path against 0.4 m,
    moves the ±0.1 m neighbours' differences by 0.013 against 0.051 m); here the differences lie within ±√2 (a
    distance is 1-Lipschitz) and are about the unit vector away from the column. A departure from the release."""
    own = d[..., 4:5]
    return torch.cat([own, (torch.cat([d[..., :4], d[..., 5:]], -1) - own) / SDF9_SPACING], -1)


def _skew_exp(w: torch.Tensor) -> torch.Tensor:
    """Rodrigues: exp(skew(w)) for w [..., 3]."""
    theta = torch.linalg.norm(w, dim=-1, keepdim=True).clamp(min=1e-12)
    k = w / theta
    K = torch.zeros(*w.shape[:-1], 3, 3, device=w.device, dtype=w.dtype)
    K[..., 0, 1], K[..., 0, 2], K[..., 1, 0] = -k[..., 2], k[..., 1], k[..., 2]
    K[..., 1, 2], K[..., 2, 0], K[..., 2, 1] = -k[..., 0], -k[..., 1], k[..., 0]
    th = theta[..., None]
    eye = torch.eye(3, device=w.device, dtype=w.dtype).expand_as(K)
    return eye + torch.sin(th) * K + (1 - torch.cos(th)) * K @ K


class FormationEnv:
    def __init__(self, cfg: FormationConfig):
        if cfg.dynamics not in ("ctbr", "pointmass") or cfg.static_mode not in ("sdf9", "sdf9_diff", "tokens"):
            raise ValueError(f"dynamics must be ctbr|pointmass and static_mode sdf9|sdf9_diff|tokens, got "
                             f"{cfg.dynamics!r}, {cfg.static_mode!r}")
        if cfg.formation_reward not in FORMATION_REWARDS:
            raise ValueError(f"formation_reward must be one of {FORMATION_REWARDS}, got {cfg.formation_reward!r}")
        if cfg.full_slot_reward and cfg.formation_reward != "release_slot":
            raise ValueError(f"full_slot_reward weights release_slot's slot term; formation_reward is "
                             f"{cfg.formation_reward!r}")
        if cfg.static_top_k < 0 or (cfg.static_top_k and cfg.static_mode != "tokens"):
            raise ValueError(f"static_top_k is a number of column tokens (0: all) for static_mode tokens, got "
                             f"{cfg.static_top_k} with static_mode {cfg.static_mode!r}")
        if cfg.num_drones < 2:
            raise ValueError("a formation needs at least 2 drones")
        if cfg.corridor_walls < 0:
            raise ValueError(f"corridor_walls is a half-width in metres (0: no walls), got {cfg.corridor_walls}")
        self.cfg, self.E, self.N = cfg, cfg.num_envs, cfg.num_drones
        self.device = torch.device(cfg.device)
        dev = self.device
        self.gen = torch.Generator(device=dev).manual_seed(cfg.seed)
        self.offsets = formation_offsets(self.N, cfg.formation_radius, cfg.formation).to(dev)
        if cfg.corridor_walls and float(self.offsets[:, 0].abs().max()) + cfg.drone_radius >= cfg.corridor_walls:
            raise ValueError(f"corridor_walls {cfg.corridor_walls} m: the formation spawns across a wall (its drones "
                             f"reach |x| = {float(self.offsets[:, 0].abs().max()):.2f} m)")
        self.target_vel = torch.tensor(cfg.target_vel, device=dev, dtype=torch.float32)
        self.final_y = 0.9 * float(self.target_vel.norm()) * cfg.max_steps * cfg.dt
        self.thrust_gain = G / cfg.hover_thrust  # acceleration per unit of normalised thrust
        # the zig-zag grid of candidate column cells
        lanes = int(round(2 * cfg.grid_border / cfg.grid_size))
        rows = int(round(cfg.corridor_length / cfg.grid_size))
        lane_x = -cfg.grid_border + cfg.grid_size * (torch.arange(lanes) + 0.5)
        row_y = cfg.static_margin + cfg.grid_size * torch.arange(rows)
        xs = lane_x[None, :] + (torch.arange(rows)[:, None] % 2) * cfg.grid_size / 4
        self.cells = torch.stack([xs, row_y[:, None].expand(rows, lanes)], -1).reshape(-1, 2).to(dev)
        if cfg.num_columns > len(self.cells):
            raise ValueError(f"{cfg.num_columns} columns do not fit the {len(self.cells)} grid cells")
        S, B = cfg.num_columns, cfg.num_balls
        E, N = self.E, self.N
        z = lambda *s: torch.zeros(*s, device=dev)  # noqa: E731
        self.p, self.v, self.w, self.T = z(E, N, 3), z(E, N, 3), z(E, N, 3), z(E, N)
        self.T_prev = self.T
        self.R = torch.eye(3, device=dev).repeat(E, N, 1, 1)
        self.prev_action = z(E, N, 4)
        self.columns, self.col_active = z(E, S, 2), torch.zeros(E, S, dtype=torch.bool, device=dev)
        self.ball_p, self.ball_v = z(E, B, 3), z(E, B, 3)
        self.ball_active = torch.zeros(E, B, dtype=torch.bool, device=dev)
        self.ball_launch = torch.zeros(E, B, dtype=torch.long, device=dev)
        self.t = torch.zeros(E, dtype=torch.long, device=dev)
        self.ret, self.disc = z(E, N, 4), torch.ones(E, device=dev)
        self.form_err_sum, self.cost_sum, self.da_sum = z(E), z(E), z(E)
        self.max_abs_x = z(E)  # of the formation centroid: did the episode go round the column field?

    # ---------------------------------------------------------------------------------------------- helpers
    def _rand(self, *shape):
        return torch.rand(*shape, generator=self.gen, device=self.device)

    def hover_action(self) -> torch.Tensor:
        """The action that keeps a level drone hovering (zero rates, hover thrust) [E, N, 4]."""
        a = torch.zeros(self.E, self.N, 4, device=self.device)
        if self.cfg.dynamics == "ctbr":
            a[..., 3] = math.atanh(2 * self.cfg.hover_thrust - 1)
        return a

    def _reset_envs(self, idx: torch.Tensor) -> None:
        cfg, n = self.cfg, len(idx)
        if n == 0:
            return
        centre = torch.tensor([0.0, 0.0, cfg.target_height], device=self.device)
        self.p[idx] = centre + self.offsets
        self.v[idx], self.w[idx] = 0.0, 0.0
        self.T[idx] = cfg.hover_thrust
        self.R[idx] = torch.eye(3, device=self.device)
        self.prev_action[idx] = 0.0
        if cfg.num_columns:
            pick = self._rand(n, len(self.cells)).argsort(-1)[:, :cfg.num_columns]
            self.columns[idx] = self.cells[pick]
            self.col_active[idx] = True
        if cfg.num_balls:
            self.ball_launch[idx] = cfg.throw_threshold + (self._rand(n, cfg.num_balls) * cfg.throw_time_range).long()
            self.ball_active[idx] = False
            self.ball_p[idx] = torch.tensor([0.0, -100.0, -100.0], device=self.device)
            self.ball_v[idx] = 0.0
        self.t[idx] = 0
        self.ret[idx], self.disc[idx] = 0.0, 1.0
        self.form_err_sum[idx], self.cost_sum[idx], self.da_sum[idx] = 0.0, 0.0, 0.0
        self.max_abs_x[idx] = 0.0

    def reset(self) -> dict:
        self._reset_envs(torch.arange(self.E, device=self.device))
        return self._obs()

    def launch_ball(self, env_ids: torch.Tensor, ball: int) -> torch.Tensor:
        """Throw ball `ball` in `env_ids` now (pattern 1 of the released code); returns the aim points [n, 3]."""
        cfg, n = self.cfg, len(env_ids)
        p = self.p[env_ids]
        lo, hi = p.min(1).values, p.max(1).values
        t_hit = cfg.time_to_hit[0] + self._rand(n) * (cfg.time_to_hit[1] - cfg.time_to_hit[0])
        aim = lo + self._rand(n, 3) * (hi - lo)
        aim = aim + self.v[env_ids].mean(1) * t_hit[:, None]
        aim[:, 2] = p[:, :, 2].mean(1)
        speed = cfg.ball_speed[0] + self._rand(n) * (cfg.ball_speed[1] - cfg.ball_speed[0])
        ang = self._rand(n) * 2 * math.pi
        vh = torch.stack([speed * torch.cos(ang), speed * torch.sin(ang)], 1)
        h = p[:, :, 2].mean(1)
        z0 = h * (0.5 + self._rand(n))
        start = torch.cat([aim[:, :2] - vh * t_hit[:, None], z0[:, None]], 1)
        vz = (aim[:, 2] - z0 + 0.5 * G * t_hit * (t_hit + cfg.dt)) / t_hit  # exact for our semi-implicit Euler
        self.ball_p[env_ids, ball] = start
        self.ball_v[env_ids, ball] = torch.cat([vh, vz[:, None]], 1)
        self.ball_active[env_ids, ball] = True
        return aim

    # ---------------------------------------------------------------------------------------------- step
    def integrate_drones(self, u: torch.Tensor) -> None:
        """The drones' dynamics for one dt from squashed actions u = tanh(a) [E, N, 4] (no balls, no events)."""
        cfg, dt = self.cfg, self.cfg.dt
        self.T_prev = self.T
        if cfg.dynamics == "ctbr":
            w_cmd, T_cmd = u[..., :3] * math.pi, ((u[..., 3] + 1) / 2).clamp(0, 0.9)
            self.w = self.w + (w_cmd - self.w) * (dt / cfg.tau_rate)
            self.T = self.T + (T_cmd - self.T) * (dt / cfg.tau_thrust)
            R = self.R @ _skew_exp(self.w * dt)
            x = torch.nn.functional.normalize(R[..., 0], dim=-1)  # Gram-Schmidt keeps R a rotation
            y = torch.nn.functional.normalize(R[..., 1] - (R[..., 1] * x).sum(-1, keepdim=True) * x, dim=-1)
            self.R = torch.stack([x, y, torch.cross(x, y, dim=-1)], -1)
            acc = self.R[..., 2] * (self.T * self.thrust_gain)[..., None] - cfg.drag * self.v
            acc[..., 2] -= G
        else:
            acc = (u[..., :3] * 3.0 - self.v) / 0.1
        self.v = self.v + acc * dt
        self.p = self.p + self.v * dt

    def step(self, actions: torch.Tensor):
        cfg, dt = self.cfg, self.cfg.dt
        actions = actions.to(self.device, torch.float32)
        u = torch.tanh(actions)
        self.integrate_drones(u)
        if cfg.num_balls:  # launches, ballistic flight, landing
            for b in range(cfg.num_balls):
                due = torch.nonzero((self.t == self.ball_launch[:, b]) & ~self.ball_active[:, b]).flatten()
                if len(due):
                    self.launch_ball(due, b)
            self.ball_v[..., 2] -= G * dt * self.ball_active
            self.ball_p = self.ball_p + self.ball_v * dt * self.ball_active[..., None]
            self.ball_active &= self.ball_p[..., 2] >= 0.2
        self.t += 1
        reward, flags = self._reward_and_flags(u)
        bad = flags["bad"]
        truncated = (self.t >= cfg.max_steps) & ~bad
        done = bad | truncated
        # episode statistics
        da = (u - self.prev_action).norm(dim=-1).mean(-1)
        self.prev_action = u
        rel = (self.p - self.p.mean(1, keepdim=True)) - (self.offsets - self.offsets.mean(0))
        self.form_err_sum += rel.norm(dim=-1).mean(-1)
        self.cost_sum += flags["cost_l"]
        self.da_sum += da
        self.max_abs_x = torch.maximum(self.max_abs_x, self.p[..., 0].mean(1).abs())
        self.ret += self.disc[:, None, None] * reward
        self.disc *= cfg.gamma
        info = {**flags, "done": done, "terminated": bad, "truncated": truncated}
        if done.any():
            idx = torch.nonzero(done).flatten()
            steps = self.t[idx].float()
            arrival = self.p[idx, :, 1].mean(-1) >= self.final_y
            ferr = self.form_err_sum[idx] / steps
            collision_free = truncated[idx]
            info["episode"] = {
                "env_ids": idx, "length": self.t[idx].clone(), "collision_free": collision_free,
                "formation_error": ferr, "laplacian_cost": self.cost_sum[idx] / steps, "arrival": arrival,
                "success": collision_free & arrival & (ferr < cfg.formation_success_error),
                "left_corridor": self.max_abs_x[idx] > cfg.grid_border,
                "returns": self.ret[idx].mean(1), "smoothness": self.da_sum[idx] / steps,
                **{cause: flags[cause][idx] for cause in END_CAUSES}}
            info["final_obs"] = self._obs()
            self._reset_envs(idx)
        return self._obs(), reward, bad, truncated, info

    def _reward_and_flags(self, u: torch.Tensor):
        cfg = self.cfg
        E, N = self.E, self.N
        p, v = self.p, self.v
        # events
        pd = torch.cdist(p, p) + torch.eye(N, device=self.device) * 1e6
        min_pair = pd.min(-1).values  # [E, N]
        crash = (p[..., 2] < cfg.z_limits[0]) | (p[..., 2] > cfg.z_limits[1])
        too_close = min_pair < cfg.hard_safe_distance
        if cfg.num_balls:
            bd = torch.linalg.norm(p[:, :, None] - self.ball_p[:, None], dim=-1)  # [E, N, B]
            bd = torch.where(self.ball_active[:, None], bd, torch.full_like(bd, 1e6))
            ball_d = bd.min(-1).values
        else:
            ball_d = torch.full((E, N), 1e6, device=self.device)
        hit_ball = ball_d < cfg.ball_radius + cfg.drone_radius
        if cfg.num_columns:
            cd = torch.linalg.norm(p[:, :, None, :2] - self.columns[:, None], dim=-1)  # [E, N, S]
            cd = torch.where(self.col_active[:, None], cd, torch.full_like(cd, 1e6))
        else:
            cd = torch.full((E, N, 1), 1e6, device=self.device)
        hit_column = cd.min(-1).values < cfg.column_radius + cfg.drone_radius
        wall_d = cfg.corridor_walls - p[..., 0].abs()  # [E, N], only read when there are walls
        hit_wall = (wall_d <= cfg.drone_radius) if cfg.corridor_walls else torch.zeros_like(hit_column)
        any_agent = lambda x: x.any(-1)  # noqa: E731
        flags = {"crash": any_agent(crash), "too_close": any_agent(too_close), "hit_ball": any_agent(hit_ball),
                 "hit_column": any_agent(hit_column), "hit_wall": any_agent(hit_wall)}
        bad = torch.stack([flags[cause] for cause in END_CAUSES]).any(0)
        flags["bad"] = bad
        # formation
        ball_on = self.ball_active.any(-1) if cfg.num_balls else torch.zeros(E, dtype=torch.bool, device=self.device)
        c = torch.where(ball_on, 0.2, 1.0)[:, None]
        cost_l = formation_cost(p, self.offsets)
        target_d = torch.cdist(self.offsets, self.offsets).max()
        size = 1 / (1 + (pd.masked_fill(pd > 1e5, 0).amax((-1, -2)) - target_d) ** 2)
        if cfg.formation_reward == "simple":
            r_form = 5 * c * (size[:, None] + 1 / (1 + cost_l[:, None]))
        else:  # the release: the un-normalised Laplacian charges a shrunken or squeezed formation, which the
            # normalised one (scale-invariant) and the size term (largest pair only) barely see
            cost_raw = formation_cost(p, self.offsets, normalized=False)
            reward_size = 3 * ((size + 1 / (1 + cost_raw) - 2) / N - 0.04 * N) + 2.36  # = the plain sum for N = 3
            reward_shape = (1 / (1 + ((cost_l - 0.04) * 10 / N) ** 2) - 0.04 * N) / 2
            after_throw = ~ball_on & (self.t[:, None] > self.ball_launch).all(-1) if cfg.num_balls else \
                torch.zeros_like(ball_on)
            r_form = 5 * ((c[:, 0] + 0.2 * after_throw) * reward_size + c[:, 0] * reward_shape)[:, None].expand(E, N)
            if cfg.formation_reward == "release_slot":  # each drone's distance from its own slot about the centroid:
                # the formation error itself, so a turned formation is charged (the Laplacian terms cannot see it)
                slot_err = ((p - p.mean(1, keepdim=True)) - (self.offsets - self.offsets.mean(0))).norm(dim=-1)
                slot_denom = 1 + (slot_err / SLOT_SCALE) ** 2
                r_form = r_form + 5 * c / slot_denom
                if cfg.full_slot_reward:  # the share c took off, added back (so the default path stays as it was)
                    r_form = r_form + 5 * (1 - c) / slot_denom
        r_form = r_form - (min_pair < 0.4).float() - 10 * (min_pair < 0.15).float()
        flags["cost_l"] = cost_l
        # obstacles
        ball_term = torch.where(ball_d < 0.4, -10.0, torch.where(ball_d < 0.6, -5 + 25 * (ball_d - 0.4),
                                                                  ball_d - 0.6))
        ball_term = torch.where(ball_d > 1e5, torch.zeros_like(ball_term), ball_term)
        col_term = (cd.clamp(cfg.column_radius, 0.4) - 0.4).mean(-1) if cfg.num_columns else torch.zeros(E, N,
                                                                                                       device=p.device)
        r_obst = 10 * ball_term + col_term - 20 * (hit_ball | hit_column).float()
        if cfg.corridor_walls:  # as a column: up to -0.4 within 0.4 m of the wall, -20 on contact
            r_obst = r_obst + (wall_d.clamp(0, 0.4) - 0.4) - 20 * hit_wall.float()
        # forward
        heading = self.R[..., 0]
        tv = self.target_vel
        height = (1 - (p[..., 2] - cfg.target_height).abs()).clamp(min=0)
        r_fwd = c * (5 * height
                     + 10 * (max(float(tv.norm()), 1.0) - (v - tv).norm(dim=-1)).clamp(min=0)
                     + (1 - (heading - torch.tensor([1.0, 0, 0], device=p.device)).norm(dim=-1)).clamp(min=0))
        if cfg.full_height_reward:  # add back the share of the height term that c took off (the default path is
            # left as it was, so runs without the option train bit for bit as before)
            r_fwd = r_fwd + (1 - c) * 5 * height
        final = torch.tensor([0.0, self.final_y, cfg.target_height], device=p.device)
        trunc = (self.t >= cfg.max_steps)[:, None] & ~bad[:, None]
        r_fwd = r_fwd + trunc * 50 / (1 + (p - final).norm(dim=-1))
        # smoothness (4 motors ~ 4 T)
        T_now = self.T if cfg.dynamics == "ctbr" else torch.full_like(self.T, cfg.hover_thrust)
        dT = 2 * (self.T - self.T_prev).abs()  # the norm of the 4 equal motor-throttle changes
        r_smooth = (0.5 * (2.5 - 4 * T_now).clamp(min=0) + (2.5 - (u - self.prev_action).norm(dim=-1)).clamp(min=0)
                    + (1.5 - self.w[..., 2].abs()).clamp(min=0) + 2 * (0.5 - dT).clamp(min=0))
        reward = torch.stack([r_form, r_obst, r_fwd, r_smooth], -1)
        terminal = 10 * trunc.float() - 10 * bad[:, None].float()
        return reward + terminal[..., None], flags

    # ---------------------------------------------------------------------------------------------- observations
    def _obs(self) -> dict:
        cfg, E, N = self.cfg, self.E, self.N
        p, v = self.p, self.v
        ids = torch.eye(N, device=self.device).expand(E, N, N)
        rot6 = self.R[..., :2].transpose(-1, -2).reshape(E, N, 6)
        p_self = p
        if cfg.relative_self_pos:  # only y with walls: the policy sees them by its absolute x
            centre = p[..., 1:2] if cfg.corridor_walls else p[..., :2]
            p_self = p - F.pad(centre.mean(1, keepdim=True), (1 if cfg.corridor_walls else 0, 1))
        self_tok = torch.cat([p_self, rot6, v, self.w, self.R[..., 0], self.R[..., 2], self.T[..., None] * 2 - 1,
                              self.target_vel - v, ids], -1)
        j = torch.tensor([[k for k in range(N) if k != i] for i in range(N)], device=self.device)  # [N, N-1]
        dp = p[:, j] - p[:, :, None]
        others = torch.cat([dp / 2, dp.norm(dim=-1, keepdim=True) / 2, v[:, j] - v[:, :, None]], -1)
        obs = {"self": self_tok, "others": others}
        B = cfg.num_balls
        if B:
            rel = self.ball_p[:, None] - p[:, :, None]  # [E, N, B, 3]
            d = rel.norm(dim=-1, keepdim=True)
            bv = self.ball_v[:, None].expand(E, N, B, 3)
            obs["balls"] = torch.cat([d, rel, bv - v[:, :, None], bv], -1)
            obs["ball_mask"] = ~self.ball_active[:, None].expand(E, N, B) | (d[..., 0] > cfg.obs_range)
            obs["balls"] = obs["balls"].masked_fill(obs["ball_mask"][..., None], 0.0)
        else:
            obs["balls"] = torch.zeros(E, N, 1, 10, device=self.device)
            obs["ball_mask"] = torch.ones(E, N, 1, dtype=torch.bool, device=self.device)
        if cfg.static_mode in ("sdf9", "sdf9_diff"):
            obs["static"] = sdf9(p[..., :2], self.columns, self.col_active, cfg.obs_range)[:, :, None].clamp(
                max=cfg.obs_range)
            if cfg.static_mode == "sdf9_diff":
                obs["static"] = sdf9_diff(obs["static"])
            obs["static_mask"] = ~self.col_active.any(-1)[:, None, None].expand(E, N, 1)
        else:
            S = max(cfg.num_columns, 1)
            if cfg.num_columns:
                rel = torch.cat([self.columns[:, None] - p[:, :, None, :2], torch.zeros(E, N, S, 1,
                                                                                      device=self.device)], -1)
                d = rel.norm(dim=-1, keepdim=True)
                tok = torch.cat([d, rel, -v[:, :, None].expand(E, N, S, 3), torch.zeros(E, N, S, 3,
                                                                                        device=self.device)], -1)
                mask = ~self.col_active[:, None].expand(E, N, S) | (d[..., 0] > cfg.obs_range)
                if 0 < cfg.static_top_k < S:  # the nearest k (masked ones last): the summary's blind spot, the
                    # column just behind the nearest one, stays in view at a fraction of the tokens
                    near = d[..., 0].masked_fill(mask, float("inf")).topk(cfg.static_top_k, -1, largest=False).indices
                    tok, mask = tok.gather(2, near[..., None].expand(-1, -1, -1, tok.shape[-1])), mask.gather(2, near)
            else:
                tok = torch.zeros(E, N, 1, 10, device=self.device)
                mask = torch.ones(E, N, 1, dtype=torch.bool, device=self.device)
            obs["static"], obs["static_mask"] = tok.masked_fill(mask[..., None], 0.0), mask
        # fixed slots (zeros where a preset has fewer balls or columns): a slot means the same in every preset
        balls = torch.zeros(E, max(B, cfg.state_max_balls), 7, device=self.device)
        if B:
            balls[:, :B] = torch.cat([self.ball_p, self.ball_v, self.ball_active[..., None].float()], -1)
        cols = torch.zeros(E, max(cfg.num_columns, cfg.state_max_columns), 3, device=self.device)
        if cfg.num_columns:
            cols[:, :cfg.num_columns] = torch.cat([self.columns, self.col_active[..., None].float()], -1)
        obs["state"] = torch.cat([p.reshape(E, -1), v.reshape(E, -1), rot6.reshape(E, -1), self.w.reshape(E, -1),
                                  balls.reshape(E, -1), cols.reshape(E, -1)], -1)
        return obs
