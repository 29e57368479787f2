"""EMC-style curiosity reward for the Q-learning backbone (used by EMU as an option).

Paper: Zheng et al., "Episodic Multi-agent Reinforcement Learning with
Curiosity-driven Exploration", NeurIPS 2021 (EMC); EMU's official code
(github.com/HyunghoNa/EMU, ``qplex_curiosity_vdn_learner``, ``vdn_Qlearner``) adds it
to its QPLEX backbone with ``curiosity_scale`` 1e-3 decaying by 0.9 every 100k steps.

Equations (per sampled batch; i agent, t slot, Q_i(tau, .) an agent network's
Q-values over the n actions)
----------------------------------------------------------------------------
A second agent network Q^v (own parameters, same architecture and inputs as the
backbone's agents) learns the extrinsic reward with VDN and double Q:
  y_t  = r'_t + gamma (1 - term_t) sum_i Qbar^v_i(tau_{i,t+1}, a*_i),  a*_i = argmax avail Q^v_i
  L_v  = masked mean over t of (sum_i Q^v_i(tau_{i,t}, a_{i,t}) - sg(y_t))^2
(Qbar^v: the copy of Q^v in the backbone's target parameters, refreshed with them.)
A soft copy Q^s <- (1 - kappa) Q^s + kappa Q^v tracks it, and a predictor P (same
architecture) learns to predict c_t Q^s:
  e_{i,t} = || P_i(tau_{i,t+1}, .) - c_t Q^s_i(tau_{i,t+1}, .) ||_2         (c_t = 10)
  L_p     = mean over valid (t, i) of e_{i,t}
The curiosity reward of transition t is
  r^c_t = beta_k * mean_i sg(e_{i,t}),   beta_k = max(beta_0 * rho^floor(steps / K), beta_min)
added to r'_t in the backbone's TD target (beta_0 = 1e-3, rho = 0.9, K = 100k, beta_min = 0).

Deviations from the official code
---------------------------------
- One optimizer: Q^v and P are parameters of the backbone's ``ext`` tree, trained in the
  backbone's gradient step (their losses are added to the TD loss; the gradients are
  disjoint, but the global-norm clip is shared). The official code trains Q^v with its
  own RMSprop and P with Adam, each clipped alone.
- The soft copy moves once per iteration, by the compounded rate 1 - (1 - kappa)^k of
  the k gradient steps of the iteration, toward the iteration's final Q^v (the
  official moves after every gradient step, kappa = 0.005).
- The decay counts env steps at iteration granularity.
- Q^v uses the backbone's scaled reward r' (so its scale matches Q_tot's); the official
  VDN learner reads the raw reward, and both use pymarl's 1-step target.
Cost: four more GRU unrolls of every sampled batch (Q^v online and target, Q^s, P),
about three times the backbone's learner work; hence off by default.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from algos import qlearning as ql
from marl import config as cfg
from marl import losses, rnn


class CuriositySettings(NamedTuple):
    scale: float = 1e-3
    """beta_0 (0: off)"""
    decay_rate: float = 0.9
    decay_interval: int = 100_000
    """env steps between decays"""
    decay_stop: float = 0.0
    tau: float = 0.005
    """soft-copy rate kappa per gradient step"""
    target_scale: float = 10.0
    """c: the predictor predicts c x the soft copy's Q-values"""

    def validate(self, prefix: str = "curiosity_"):
        cfg.check_nonnegative(prefix + "scale", self.scale)
        cfg.check_range(prefix + "decay_rate", self.decay_rate, 0.0, 1.0)
        cfg.check_positive(prefix + "decay_interval", self.decay_interval, integer=True)
        cfg.check_nonnegative(prefix + "decay_stop", self.decay_stop)
        cfg.check_range(prefix + "tau", self.tau, 0.0, 1.0)
        cfg.check_positive(prefix + "target_scale", self.target_scale)


def scale_at(env_steps, s: CuriositySettings):
    """beta at ``env_steps``: beta_0 rho^floor(steps / K), never below beta_min."""
    k = jnp.floor(jnp.asarray(env_steps, jnp.float32) / s.decay_interval)
    return jnp.maximum(s.scale * jnp.power(s.decay_rate, k), s.decay_stop)


def soft_update(target, source, tau_per_step: float, steps: int):
    """``target`` moved toward ``source`` by the rate of ``steps`` soft updates of
    ``tau_per_step`` each: 1 - (1 - tau)^steps."""
    rate = 1.0 - (1.0 - tau_per_step) ** steps
    return jax.tree.map(lambda t, p: (1.0 - rate) * t + rate * p, target, source)


def prediction_error(pred_q, soft_q, target_scale: float):
    """e [..., A]: L2 distance over actions between the predictor's outputs and
    ``target_scale`` x the soft copy's Q-values (both [..., A, n])."""
    d2 = jnp.sum((pred_q - target_scale * jax.lax.stop_gradient(soft_q)) ** 2, -1)
    positive = d2 > 0  # sqrt's gradient at 0 is infinite: zero-error slots (padding) get gradient 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, d2, 1.0)), 0.0)


def curiosity_reward(err, mask, beta):
    """r^c [B, T] = beta * mean over agents of the stopped error ``err`` [B, T, A] of
    transition t (computed at t + 1), 0 where ``mask`` [B, T] is off."""
    return beta * jax.lax.stop_gradient(err).mean(-1) * mask


def predictor_loss(err, mask):
    """Mean of e over the valid transitions and all agents (the official normalization)."""
    return (err * mask[..., None]).sum() / jnp.maximum(mask.sum() * err.shape[-1], 1.0)


def vdn_td_loss(q, tq, batch, reward, gamma, double_q: bool = True):
    """VDN's 1-step double-Q TD loss of agent Q-values q / tq [B, T+1, A, n] on the
    sampled episodes (``reward`` [B, T] already scaled)."""
    mask = batch["filled"][:, 1:].astype(jnp.float32)
    chosen = losses.take(q[:, :-1], batch["action"][:, :-1]).sum(-1)
    _, t_chosen, _ = losses.next_actions(jax.lax.stop_gradient(q[:, 1:]), tq[:, 1:], batch["avail"][:, 1:], double_q)
    term = batch["terminated"][:, :-1].astype(jnp.float32)
    y = jax.lax.stop_gradient(reward + gamma * (1.0 - term) * t_chosen.sum(-1))
    return (((chosen - y) * mask) ** 2).sum() / jnp.maximum(mask.sum(), 1.0)


class Curiosity(NamedTuple):
    """The pieces EMU's hooks call (see :func:`make`)."""

    init: object  # key -> (ext params {"vdn", "predictor"}, soft copy)
    reward: object  # (ext params, soft copy, batch, env_steps) -> (r^c [B, T], metrics)
    loss: object  # (ext params, target ext params, soft copy, batch, gamma) -> (loss, metrics)
    after_iteration: object  # (soft copy, ext params) -> soft copy


def make(spec, config: ql.QLearningConfig, settings: CuriositySettings, reward_scale: float) -> Curiosity:
    """Curiosity for the backbone ``config`` on an env with ``spec``."""
    n = spec.num_actions
    agent = rnn.RNNAgent(n, config.hidden)
    in_dim = ql.base_input_dim(spec, config)

    def inputs(batch):
        return ql.base_agent_inputs(
            batch["obs"], ql.previous_actions(batch["action"]), n, config.last_action, config.agent_ids
        )

    def unroll(params, batch):
        return rnn.unroll_chunked(agent, params, inputs(batch), ql.unroll_slots(batch, config), config.gru_autodiff)

    def init(key):
        k_v, k_p = jax.random.split(key)
        x0 = jnp.zeros((1, spec.num_agents, in_dim))
        h0 = jnp.zeros((1, spec.num_agents, config.hidden))
        vdn = agent.init(k_v, h0, x0)
        return {"vdn": vdn, "predictor": agent.init(k_p, h0, x0)}, vdn

    def errors(ext_params, soft, batch):
        pred = unroll(ext_params["predictor"], batch)[:, 1:]
        soft_q = unroll(soft, batch)[:, 1:]
        return prediction_error(pred, soft_q, settings.target_scale)

    def reward(ext_params, soft, batch, env_steps):
        mask = batch["filled"][:, 1:].astype(jnp.float32)
        beta = scale_at(env_steps, settings)
        r = curiosity_reward(errors(jax.lax.stop_gradient(ext_params), soft, batch), mask, beta)
        return r, {"curiosity_reward": r.sum() / jnp.maximum(mask.sum(), 1.0), "curiosity_scale": beta}

    def loss(ext_params, target_ext, soft, batch, gamma):
        mask = batch["filled"][:, 1:].astype(jnp.float32)
        p_loss = predictor_loss(errors(ext_params, soft, batch), mask)
        q = unroll(ext_params["vdn"], batch)
        tq = jax.lax.stop_gradient(unroll(target_ext["vdn"], batch))
        v_loss = vdn_td_loss(q, tq, batch, reward_scale * batch["reward"][:, :-1], gamma, config.double_q)
        return p_loss + v_loss, {"curiosity_predictor_loss": p_loss, "curiosity_vdn_loss": v_loss}

    def after_iteration(soft, ext_params):
        return soft_update(soft, ext_params["vdn"], settings.tau, config.train_steps)

    return Curiosity(init, reward, loss, after_iteration)
