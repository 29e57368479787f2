"""Recurrent agents: a GRU Q-network and its chunked training unroll.

The GRU's backward pass along time is written out (:func:`gru_recurrence`): autodiff
of a ``lax.scan`` adds a full [H, 3H] weight gradient to its carry at every step, which
made the backward pass about 10x the forward at hidden 512 on a CPU. :func:`gru_scan`
is the same recurrence under plain autodiff, selectable per backend.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from marl.networks import dense, orthogonal

UNROLL_CHUNK = 8  # time slots per chunk of the training unroll (see :func:`unroll_chunked`)


class RNNAgent(nn.Module):
    """Linear -> ReLU -> GRU -> Linear(n): one agent's Q-values, parameters shared.

    The GRU's input-side products do not depend on the hidden state, so
    :meth:`encode` computes them for a whole sequence at once and only
    :meth:`recur` (one [H, 3H] product) runs inside the time scan; :meth:`head`
    maps hidden states to Q-values. Gates as in ``flax.linen.GRUCell``:
    r = sig(W_ir x + W_hr h + b_r), z = sig(W_iz x + W_hz h + b_z),
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), h' = (1 - z) n + z h.
    """

    num_actions: int
    hidden: int
    out_scale: float = 1.0
    """orthogonal init scale of the output layer"""

    def setup(self):
        self.fc = dense(self.hidden)
        self.gru_x = nn.Dense(3 * self.hidden, kernel_init=orthogonal(1.0))
        self.gru_h = nn.Dense(3 * self.hidden, kernel_init=orthogonal(1.0))
        self.out = dense(self.num_actions, scale=self.out_scale)

    def encode(self, x):
        return self.gru_x(nn.relu(self.fc(x)))

    def recur(self, h, xi):
        hh = self.gru_h(h)
        xr, xz, xn = jnp.split(xi, 3, -1)
        hr, hz, hn = jnp.split(hh, 3, -1)
        r = nn.sigmoid(xr + hr)
        z = nn.sigmoid(xz + hz)
        cand = jnp.tanh(xn + r * hn)
        return (1.0 - z) * cand + z * h

    def recur_sequence(self, h0, xi, autodiff: bool = False):
        """:meth:`recur` over xi [K, ..., 3H] from h0 (hand-written backward pass, or
        plain autodiff of the scan with ``autodiff=True``)."""
        p = self.gru_h.variables["params"]
        return (gru_scan if autodiff else gru_recurrence)(p["kernel"], p["bias"], xi, h0)

    def head(self, h):
        return self.out(h)

    def __call__(self, h, x):
        h = self.recur(h, self.encode(x))
        return h, self.head(h)


def _gru_gates(w, b, h, xi):
    hr, hz, hn = jnp.split(h @ w + b, 3, -1)
    xr, xz, xn = jnp.split(xi, 3, -1)
    r = jax.nn.sigmoid(xr + hr)
    z = jax.nn.sigmoid(xz + hz)
    cand = jnp.tanh(xn + r * hn)
    return r, z, cand, hn


def gru_scan(w, b, xi, h0):
    """Hidden states [K, ..., H] of :meth:`RNNAgent.recur` run over xi [K, ..., 3H] from
    h0 (``w`` [H, 3H], ``b`` [3H]: the recurrent kernel and bias); differentiated by
    plain autodiff of the scan."""

    def step(h, x):
        _, z, cand, _ = _gru_gates(w, b, h, x)
        h = (1.0 - z) * cand + z * h
        return h, h

    return jax.lax.scan(step, h0, xi)[1]


@jax.custom_vjp
def gru_recurrence(w, b, xi, h0):
    """:func:`gru_scan` with a written-out backward pass: the reverse scan carries only
    dh and emits the gate gradients, and the weight gradient is one contraction over
    all steps afterwards. (Autodiff of the scan instead adds a full [H, 3H] weight
    gradient into its carry at every step, which made the backward pass ~10x the
    forward at hidden 512 on a CPU.)
    """
    return gru_scan(w, b, xi, h0)


def _gru_fwd(w, b, xi, h0):
    hs = gru_recurrence(w, b, xi, h0)
    return hs, (w, b, xi, h0, hs)


def _gru_bwd(res, d_hs):
    w, b, xi, h0, hs = res
    h_prev = jnp.concatenate([h0[None], hs[:-1]], 0)

    def back(dh, inp):
        x, hp, d_out = inp
        dh = dh + d_out
        r, z, cand, hn = _gru_gates(w, b, hp, x)
        d_pre_n = dh * (1.0 - z) * (1.0 - cand**2)
        d_pre_r = d_pre_n * hn * r * (1.0 - r)
        d_pre_z = dh * (hp - cand) * z * (1.0 - z)
        d_hh = jnp.concatenate([d_pre_r, d_pre_z, d_pre_n * r], -1)
        d_x = jnp.concatenate([d_pre_r, d_pre_z, d_pre_n], -1)
        return dh * z + d_hh @ w.T, (d_x, d_hh)

    dh0, (d_xi, d_hh) = jax.lax.scan(back, jnp.zeros_like(h0), (xi, h_prev, d_hs), reverse=True)
    flat_h, flat_d = h_prev.reshape(-1, w.shape[0]), d_hh.reshape(-1, w.shape[1])
    return flat_h.T @ flat_d, flat_d.sum(0), d_xi, dh0


gru_recurrence.defvjp(_gru_fwd, _gru_bwd)


def unroll_chunked(agent: RNNAgent, agent_params, x, n_slots, autodiff: bool = False):
    """Outputs [B, S, ..., out] of ``agent`` run along sequences x [B, S, ..., D] from a
    zero hidden state (stored episodes from t = 0).

    Time runs in chunks of ``UNROLL_CHUNK`` slots: each chunk encodes its inputs in one
    product, then runs the recurrence (:func:`gru_recurrence`, hand-written backward).
    Chunks that start at or past ``n_slots`` (the longest sequence: pass it maximized
    over the seeds of a vmapped run, :func:`max_over_seeds`, so the branch is uniform)
    are skipped; their outputs are 0 (callers mask them). ``autodiff=True``: plain
    autodiff of the recurrence (:func:`gru_scan`) instead.
    """
    B, S = x.shape[:2]
    K = UNROLL_CHUNK
    C = -(-S // K)
    x = jnp.pad(x, ((0, 0), (0, C * K - S)) + ((0, 0),) * (x.ndim - 2))
    x = jnp.moveaxis(x.reshape((B, C, K) + x.shape[2:]), 0, 2)  # [C, K, B, ..., D]

    def chunk(h, inp):
        c, x_c = inp

        def run(h):
            xi = agent.apply(agent_params, x_c, method=RNNAgent.encode)
            hs = agent.apply(agent_params, h, xi, autodiff, method=RNNAgent.recur_sequence)
            return hs[-1], agent.apply(agent_params, hs, method=RNNAgent.head)

        def skip(h):
            return h, jnp.zeros((K,) + h.shape[:-1] + (agent.num_actions,), h.dtype)

        return jax.lax.cond(c * K < n_slots, run, skip, h)

    h0 = jnp.zeros((B,) + x.shape[3:-1] + (agent.hidden,))
    _, ys = jax.lax.scan(chunk, h0, (jnp.arange(C), x))
    return jnp.moveaxis(ys.reshape((C * K, B) + ys.shape[3:]), 1, 0)[:, :S]
