r"""Value-factorization mixers for cooperative Q-learning (flax.linen).

Every mixer is called as ``mixer.apply(variables, qs, states, actions_onehot=None, max_qs=None)``

```
qs              [..., A]      chosen-action utilities Q_i(tau_i, a_i) of the A agents
states          [..., S]      global state s
actions_onehot  [..., A, n]   one-hot joint action (QPLEX only)
max_qs          [..., A]      V_i = max_a Q_i(tau_i, a) (QPLEX only)
returns         [...]         Q_tot  (``IndependentQ``: [..., A], see below)
```

Leading dimensions are arbitrary (``[B, T]`` in a learner); all layers act on the
last axis, so nothing is flattened. Initialise with :func:`init_mixer` (or
``mixer.init`` with inputs of the shapes above; QPLEX needs ``actions_onehot`` and
``max_qs`` at init to create its advantage weights). All weights use ``nn.Dense``'s
default lecun-normal initializer: no orthogonal init, so no QR decomposition, which
deadlocks under ``vmap`` with jax 0.10 on CPU.

VDN (Sunehag et al. 2018)
    Q_tot = sum_i Q_i.

QMIX (Rashid et al. 2018), pymarl's ``QMixer`` with two hypernetwork layers
    W_1(s) = |hyper_w1(s)| in R^{A x E},   b_1(s) = Linear(s) in R^E
    w_2(s) = |hyper_w2(s)| in R^E,          V(s) = Linear-ReLU-Linear(s) in R
    h = elu(Q W_1(s) + b_1(s)),             Q_tot = h . w_2(s) + V(s)
    hyper_w1, hyper_w2 = Linear(S, hypernet_embed) - ReLU - Linear; E = embed_dim.
    Monotonic: dQ_tot/dQ_i = sum_e w_2e elu'(.)_e W_1ie >= 0.

QPLEX (Wang et al. 2021), the official ``DMAQ_QattenMixer`` (duplex dueling with
Qatten transformation weights), with is_minus_one and is_stop_gradient on:
    V_i = max_qs_i,  A_i = Q_i - V_i <= 0
    transformation   w_i(s) = sum_h |u_h(s)| softmax_i(<f_h(s), g_h(e_i)> / sqrt(E)) + 1e-10 >= 0
                     b_i(s) = V(s) / A
    Q_i' = w_i Q_i + b_i,  V_i' = w_i V_i + b_i,  A_i' = Q_i' - V_i' = w_i A_i <= 0
    lambda_i(s, a) = sum_k (|key_k(s)| + 1e-10) sigmoid(agent_k(s))_i sigmoid(action_k(s, a))_i >= 0
    V_tot = sum_i V_i',  A_tot = sum_i lambda_i(s, a) A_i',  Q_tot = V_tot + A_tot
  with h over ``num_heads`` attention heads (selector f_h: S -> hypernet_embed -> ReLU -> E,
  no bias; key g_h: linear, no bias; head weight u_h: S -> hypernet_embed -> ReLU -> 1),
  k over ``num_kernels`` kernels (key_k, agent_k on s and action_k on [s, onehot(a)],
  MLPs of ``adv_hypernet_layers`` layers of width ``adv_hypernet_embed``) and
  V(s): S -> E -> ReLU -> 1. Hence A_tot = 0 at the greedy joint action (every
  Q_i == V_i) and A_tot <= 0 elsewhere, so argmax Q_tot is the greedy joint action (IGM).
  As in the official code, the value is computed as
    Q_tot = sum_i Q_i' + sum_i (lambda_i - 1) * stop_gradient(A_i')
  (equal to V_tot + A_tot), so Q_i is trained through w_i and the advantage term
  trains only lambda. Called without ``actions_onehot``/``max_qs`` it returns
  sum_i Q_i' (the official ``is_v=True`` path): Q_tot of the greedy joint action when
  ``qs`` are the greedy utilities, as in the double-Q target.
  Defaults: embed_dim 32, hypernet_embed 64, 4 heads, 4 kernels (specs/emu.md),
  adv_hypernet_layers 3 of width 64, weighted heads and the state bias V(s) on.
  Deviations / choices: the per-agent entity features e_i are the first A * unit_dim
  entries of the state, reshaped [A, unit_dim], as in the official code, when
  ``unit_dim > 0``; with the default ``unit_dim = 0`` (generic environments, no state
  layout assumed) e_i is the one-hot agent id, i.e. learned per-agent keys. Qatten's
  "nonlinear" (Q_i in the keys) and "mask_dead" options are not implemented.
  Qatten's attention regularizer (coefficient 0.001 in the official configs) is the
  per-sample sum_h mean_i logits_{h,i}^2 of the value path; get it with
  :func:`apply_with_aux` and take its masked mean in the loss.

IndependentQ (``make_mixer("none")``): independent Q-learning, no mixing. It returns
``qs`` unchanged, ``[..., A]``: the learner then regresses every agent's utility on
its own target (rewards broadcast over agents).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from marl.config import ConfigError, check_choice, check_positive
from marl.networks import relu_stack

__all__ = [
    "MIXERS",
    "VDN",
    "QMIX",
    "QPLEX",
    "IndependentQ",
    "make_mixer",
    "init_mixer",
    "apply_with_aux",
]

MIXERS = ("vdn", "qmix", "qplex", "none")


class IndependentQ(nn.Module):
    """No mixing: returns the per-agent ``qs`` ``[..., A]`` (independent Q-learning)."""

    @nn.compact
    def __call__(self, qs, states, actions_onehot=None, max_qs=None):
        return qs


class VDN(nn.Module):
    """Value decomposition: Q_tot = sum_i Q_i. No parameters."""

    @nn.compact
    def __call__(self, qs, states, actions_onehot=None, max_qs=None):
        return jnp.sum(qs, axis=-1)


class QMIX(nn.Module):
    """Monotonic mixing network conditioned on the state through hypernetworks."""

    embed_dim: int = 32
    hypernet_embed: int = 64
    out_init_scale: Optional[float] = None
    """if set, the hypernetworks' output layers start at this (variance-scaling) scale,
    so the mixing weights start near zero; None keeps flax's default initializer"""

    @nn.compact
    def __call__(self, qs, states, actions_onehot=None, max_qs=None):
        num_agents = qs.shape[-1]
        out_init = (
            nn.linear.default_kernel_init
            if self.out_init_scale is None
            else nn.initializers.variance_scaling(self.out_init_scale**2, "fan_in", "normal")
        )
        hyper = functools.partial(hypernet, 2, self.hypernet_embed, out_init=out_init)
        w1 = jnp.abs(hyper(num_agents * self.embed_dim, "hyper_w1")(states))
        w1 = w1.reshape(w1.shape[:-1] + (num_agents, self.embed_dim))
        b1 = nn.Dense(self.embed_dim, name="hyper_b1")(states)
        hidden = nn.elu(jnp.einsum("...a,...ae->...e", qs, w1) + b1)
        w2 = jnp.abs(hyper(self.embed_dim, "hyper_w2")(states))
        v = nn.Dense(1, name="V_1")(nn.relu(nn.Dense(self.embed_dim, name="V_0")(states)))
        return jnp.sum(hidden * w2, axis=-1) + v[..., 0]


def hypernet(
    layers: int,
    hidden: int,
    out: int,
    name: str,
    *,
    out_init: Callable = nn.linear.default_kernel_init,
    out_bias: bool = True,
) -> Callable[[jax.Array], jax.Array]:
    """The mixers' MLPs (hypernetworks, heads, V(s)) on the shared builder
    ``marl.networks.relu_stack``: ``layers`` Dense layers named ``{name}_0 ..
    {name}_{layers-1}`` (pymarl's layout, flax's default initializers), ReLU between them,
    width ``hidden`` and ``out`` outputs; ``out_init`` / ``out_bias`` set the output layer.
    Call the result inside a compact module (the layers become its parameters)."""

    def apply(x):
        names = iter(range(layers - 1))
        h = relu_stack(x, (hidden,) * (layers - 1), lambda width: nn.Dense(width, name=f"{name}_{next(names)}"))
        return nn.Dense(out, kernel_init=out_init, use_bias=out_bias, name=f"{name}_{layers - 1}")(h)

    return apply


class QPLEX(nn.Module):
    """Duplex dueling mixer (``DMAQ_QattenMixer``); equations in the module docstring."""

    embed_dim: int = 32
    hypernet_embed: int = 64
    num_heads: int = 4
    num_kernels: int = 4
    adv_hypernet_layers: int = 3
    adv_hypernet_embed: int = 64
    unit_dim: int = 0
    weighted_head: bool = True
    state_bias: bool = True
    stop_gradient_adv: bool = True

    # Everything is built in one compact method because A and n are only known from
    # the inputs; __call__ and decompose are thin views of it.
    @nn.compact
    def _parts(self, qs, states, actions_onehot=None):
        """(w [..., A] >= 0, b [..., A], attention reg [...], lambda [..., A] or None)."""
        if self.adv_hypernet_layers not in (1, 2, 3):
            raise ConfigError("adv_hypernet_layers", self.adv_hypernet_layers, "must be 1, 2 or 3")
        num_agents = qs.shape[-1]
        if self.unit_dim > 0:
            entities = states[..., : num_agents * self.unit_dim]
            entities = entities.reshape(states.shape[:-1] + (num_agents, self.unit_dim))
        else:
            entities = jnp.eye(num_agents, dtype=states.dtype)  # [A, A], broadcast over leading dims
        probs, sq_logits = [], 0.0
        for h in range(self.num_heads):
            selector = hypernet(2, self.hypernet_embed, self.embed_dim, f"selector{h}", out_bias=False)(states)
            keys = nn.Dense(self.embed_dim, use_bias=False, name=f"key{h}")(entities)  # [..., A, E]
            logits = jnp.einsum("...e,...ae->...a", selector, keys)
            probs.append(nn.softmax(logits / jnp.sqrt(float(self.embed_dim)), axis=-1))
            sq_logits = sq_logits + jnp.mean(logits**2, axis=-1)
        probs = jnp.stack(probs, axis=-2)  # [..., H, A]
        if self.weighted_head:
            head_w = hypernet(2, self.hypernet_embed, self.num_heads, "head_w")(states)
            probs = probs * jnp.abs(head_w)[..., None]
        w = jnp.sum(probs, axis=-2) + 1e-10
        if self.state_bias:
            v = hypernet(2, self.embed_dim, 1, "V")(states)  # [..., 1]
            b = jnp.broadcast_to(v / num_agents, w.shape)
        else:
            b = jnp.zeros_like(w)
        if actions_onehot is None:
            return w, b, sq_logits, None

        layers, width = self.adv_hypernet_layers, self.adv_hypernet_embed
        flat_actions = actions_onehot.reshape(actions_onehot.shape[:-2] + (-1,)).astype(states.dtype)
        state_action = jnp.concatenate([states, flat_actions], axis=-1)
        lam = 0.0
        for k in range(self.num_kernels):
            key = jnp.abs(hypernet(layers, width, 1, f"adv_key{k}")(states)) + 1e-10  # [..., 1]
            agents = nn.sigmoid(hypernet(layers, width, num_agents, f"adv_agents{k}")(states))
            action = nn.sigmoid(hypernet(layers, width, num_agents, f"adv_action{k}")(state_action))
            lam = lam + key * agents * action
        return w, b, sq_logits, lam

    def decompose(self, qs, states, actions_onehot, max_qs):
        """(V_tot [...], A_tot [...]) with Q_tot = V_tot + A_tot, computed directly (no stop-gradient)."""
        w, b, _, lam = self._parts(qs, states, actions_onehot)
        v_tot = jnp.sum(w * max_qs + b, axis=-1)
        a_tot = jnp.sum(lam * w * (qs - max_qs), axis=-1)
        return v_tot, a_tot

    def __call__(self, qs, states, actions_onehot=None, max_qs=None):
        if (actions_onehot is None) != (max_qs is None):
            raise ValueError("QPLEX needs both actions_onehot and max_qs (or neither, for the greedy value)")
        w, b, sq_logits, lam = self._parts(qs, states, actions_onehot)
        if not self.is_initializing():
            self.sow("losses", "attention_logits_sq", sq_logits)
        q_tot = jnp.sum(w * qs + b, axis=-1)  # sum_i Q_i'
        if lam is None:
            return q_tot
        adv = w * (qs - max_qs)  # A_i' = Q_i' - V_i'
        if self.stop_gradient_adv:
            adv = jax.lax.stop_gradient(adv)
        return q_tot + jnp.sum((lam - 1.0) * adv, axis=-1)


def make_mixer(
    name: str,
    embed_dim: int = 32,
    hypernet_embed: int = 64,
    num_heads: int = 4,
    num_kernels: int = 4,
    adv_hypernet_layers: int = 3,
    adv_hypernet_embed: int = 64,
    unit_dim: int = 0,
    out_init_scale: Optional[float] = None,
) -> nn.Module:
    """The mixer called ``name`` (vdn | qmix | qplex | none); unused sizes are ignored.

    ``"none"`` is independent Q-learning: :class:`IndependentQ` returns the per-agent
    ``qs`` ``[..., A]`` instead of a scalar. Raises :class:`marl.config.ConfigError`
    (field ``mixer``) for an unknown name, and names the size field for a bad size.
    """
    check_choice("mixer", name, MIXERS)
    if name == "vdn":
        return VDN()
    if name == "none":
        return IndependentQ()
    for field, value in (("embed_dim", embed_dim), ("hypernet_embed", hypernet_embed)):
        check_positive(field, value, integer=True)
    if name == "qmix":
        return QMIX(embed_dim=embed_dim, hypernet_embed=hypernet_embed, out_init_scale=out_init_scale)
    for field, value in (
        ("num_heads", num_heads),
        ("num_kernels", num_kernels),
        ("adv_hypernet_embed", adv_hypernet_embed),
    ):
        check_positive(field, value, integer=True)
    check_choice("adv_hypernet_layers", adv_hypernet_layers, (1, 2, 3))
    if not (isinstance(unit_dim, int) and unit_dim >= 0):
        raise ConfigError("unit_dim", unit_dim, "must be an integer >= 0")
    return QPLEX(
        embed_dim=embed_dim,
        hypernet_embed=hypernet_embed,
        num_heads=num_heads,
        num_kernels=num_kernels,
        adv_hypernet_layers=adv_hypernet_layers,
        adv_hypernet_embed=adv_hypernet_embed,
        unit_dim=unit_dim,
    )


def init_mixer(
    mixer: nn.Module,
    key: jax.Array,
    num_agents: int,
    state_dim: int,
    num_actions: int,
    batch_shape: Sequence[int] = (1,),
) -> Any:
    """Variables of ``mixer`` for A agents, state size S and n actions (dummy inputs, any batch shape)."""
    lead = tuple(batch_shape)
    qs = jnp.zeros(lead + (num_agents,))
    states = jnp.zeros(lead + (state_dim,))
    actions = jnp.zeros(lead + (num_agents, num_actions))
    return mixer.init(key, qs, states, actions, qs)


def apply_with_aux(
    mixer: nn.Module,
    variables: dict,
    qs,
    states,
    actions_onehot=None,
    max_qs: Optional[jax.Array] = None,
) -> tuple[jax.Array, jax.Array]:
    """``(q_tot, attention_reg)``; ``attention_reg`` ``[...]`` is QPLEX's per-sample
    sum_h mean_i logits^2 (multiply its masked mean by the regularizer coefficient),
    zeros for mixers without one."""
    q_tot, state = mixer.apply(variables, qs, states, actions_onehot, max_qs, mutable=["losses"])
    sown = state.get("losses", {}).get("attention_logits_sq")
    reg = sown[0] if sown is not None else jnp.zeros(qs.shape[:-1], qs.dtype)
    return q_tot, reg
