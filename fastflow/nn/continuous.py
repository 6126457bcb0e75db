"""Continuous normalizing flows: ``dz/dt = v(z, t[, c])`` solved by ``torchdiffeq``.

FFJORD (Grathwohl et al., 2019, "FFJORD: Free-form Continuous Dynamics for Scalable Reversible
Generative Models"), after Neural ODEs (Chen et al., 2018). Along a trajectory the log-density
obeys ``d log p(z_t) / dt = -tr(dv/dz)`` (the instantaneous change of variables), so the log-det
of the map is the time integral of the trace of the Jacobian of the vector field. The trace is
computed exactly (for :class:`ODEVectorField` in closed form, the Jacobian carried through the
layers in one batched pass; for a custom field by ``D`` vector-Jacobian products) or by Hutchinson's estimator
``e^T (dv/dz) e`` with one Gaussian or Rademacher probe per sample, fixed over the solve
(FFJORD's choice: the solver then integrates a smooth function of time).

Time runs from ``t = 0`` (noise, the base distribution) to ``t = t1`` (data), the convention of
flow matching (Lipman et al., 2023), so the same vector field trains by maximum likelihood
through the ODE or by conditional flow matching without solving it
(:meth:`CNF.flow_matching_loss`). ``forward`` (data to noise) integrates from ``t1`` down to 0.

The solver is torchdiffeq's ``odeint`` (or ``odeint_adjoint`` with ``adjoint=True``: O(1) memory
in the number of solver steps, gradients by solving the adjoint ODE backwards; the gradient with
respect to a context tensor is then not propagated, only to the vector field's parameters).
Adaptive methods (``"dopri5"``, ...) use ``rtol``/``atol``; fixed-step ones (``"rk4"``,
``"euler"``, ``"midpoint"``) use ``step_size``. Either way a solve takes at most ``max_num_steps``
steps: a fixed grid finer than that is refused when the layer is built, an adaptive solve that
needs more (tolerances below the dtype's resolution, a stiff or exploding field) raises
:class:`ODESolverError`, as does any other failure of the solver (its step size underflowing).

A row of the input (or of the context) holding NaN or infinity is left out of the solve: its
outputs and log-det are NaN, the other rows are those of the batch without it (as every other
layer keeps NaN in its row).

``torch.export`` traces the solve through :mod:`fastflow.nn._ode` (torchdiffeq's algorithms
without host syncs; ``euler``, ``midpoint``, ``rk4``, ``dopri5``, exact trace only).
"""

from __future__ import annotations

import contextlib
import math
import numbers

import torch
from torch import nn

from fastflow.nn.base import Transform
from fastflow.nn.residual import ConvergenceError

__all__ = ["ODEVectorField", "CNF", "ODESolverError"]

TRACES = ("exact", "hutchinson")
PROBES = ("gaussian", "rademacher")
FIXED_STEP = ("euler", "midpoint", "rk4", "explicit_adams", "implicit_adams")
ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


class ODESolverError(ConvergenceError):
    """The ODE solver did not reach the end time: more than ``max_num_steps`` steps, or the
    solver gave up (its step underflowed, the state became non-finite)."""


def _real(key, value, positive=False):
    """``value`` as a finite float (``>= 0``, or ``> 0`` with ``positive``); raises naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"CNF: {key} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"CNF: {key} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return value


def _act(name):
    table = {"tanh": nn.Tanh, "softplus": nn.Softplus, "silu": nn.SiLU, "elu": nn.ELU}
    if name not in table:
        raise ValueError(f"activation={name!r}: expected one of {sorted(table)} (smooth, for the ODE solver)")
    return table[name]()


def _value_and_derivative(act, a):
    """``(act(a), act'(a))`` for the activations :func:`_act` builds (the value is the module's
    own, so the field's values are the eager forward's, bit for bit)."""
    if isinstance(act, nn.Tanh):
        h = torch.tanh(a)
        return h, 1 - h * h
    if isinstance(act, nn.Softplus):
        scaled = a * act.beta
        return act(a), torch.where(scaled > act.threshold, torch.ones_like(a), torch.sigmoid(scaled))
    if isinstance(act, nn.SiLU):
        s = torch.sigmoid(a)
        return act(a), s * (1 + a * (1 - s))
    if isinstance(act, nn.ELU):
        return act(a), torch.where(a > 0, torch.ones_like(a), act.alpha * torch.exp(a))
    raise TypeError(f"no closed-form derivative for {type(act).__name__}")


class ODEVectorField(nn.Module):
    """``v(t, z[, c])``: an MLP with the time (and the context) concatenated to every layer's input
    (FFJORD's "concat" layers), ``(B, D) -> (B, D)``.

    Args:
        features: ``D``.
        hidden_features, num_layers: width and number of hidden layers.
        context_features: width of an optional context vector.
        activation: a smooth activation (``"tanh"``, ``"softplus"``, ``"silu"``, ``"elu"``).
    """

    def __init__(self, features, hidden_features=64, num_layers=3, context_features=None, activation="tanh"):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"ODEVectorField: num_layers must be >= 1, got {num_layers}")
        self.features, self.context_features = features, context_features
        extra = 1 + (context_features or 0)
        widths = [features] + [hidden_features] * num_layers + [features]
        self.linears = nn.ModuleList(nn.Linear(a + extra, b) for a, b in zip(widths[:-1], widths[1:]))
        self.acts = nn.ModuleList(_act(activation) for _ in range(num_layers))

    def _extra(self, t, z, context):
        if self.context_features and context is None:
            raise ValueError(f"ODEVectorField was built with context_features={self.context_features} "
                             "but got no context")
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device).reshape(-1, 1).expand(z.shape[0], 1)
        return t if not self.context_features else torch.cat([t, context.to(z.dtype)], dim=1)

    def forward(self, t, z, context=None):
        extra = self._extra(t, z, context)
        h = z
        for i, lin in enumerate(self.linears):
            h = lin(torch.cat([h, extra], dim=1))
            if i < len(self.acts):
                h = self.acts[i](h)
        return h

    def value_and_trace(self, t, z, context=None):
        """``(v(t, z), tr dv/dz)`` with the Jacobian carried through the layers in closed form
        (``W_L diag(f'(a_{L-1})) ... W_1`` restricted to the state's columns): one batched pass,
        no autograd inside, so ``torch.export`` traces it (the exported CNF's exact trace)."""
        extra = self._extra(t, z, context)
        # the transposed Jacobian (B, D, width): each layer is one (B*D, width) x (width, width')
        # matrix product (a batched matmul against the weight would broadcast it B times)
        h, jt = z, None
        for i, lin in enumerate(self.linears):
            a = lin(torch.cat([h, extra], dim=1))
            w = lin.weight[:, :h.shape[1]]
            jt = w.t().expand(z.shape[0], -1, -1) if jt is None else torch.matmul(jt, w.t())
            if i < len(self.acts):
                h, d = _value_and_derivative(self.acts[i], a)
                jt = jt * d.unsqueeze(1)
            else:
                h = a
        return h, torch.diagonal(jt, dim1=-2, dim2=-1).sum(-1)


class _Dynamics(nn.Module):
    """The augmented ODE ``d(z, l)/dt = (v, tr dv/dz)`` that torchdiffeq integrates."""

    def __init__(self, field):
        super().__init__()
        self.field = field
        self.context, self.probe, self.exact, self.nfe = None, None, False, 0

    def forward(self, t, state):
        z = state[0]
        self.nfe += 1
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            if not (create_graph and z.requires_grad):  # values only (or a state outside any graph)
                z = z.detach().requires_grad_(True)
            if self.exact and isinstance(self.field, ODEVectorField):
                # the closed-form trace: one pass instead of D vector-Jacobian products, and the
                # very values the exported solve computes (fastflow/nn/_ode.py)
                dz, tr = self.field.value_and_trace(t, z, self.context)
            else:
                dz = self.field(t, z, self.context)
            if self.exact is None:  # sampling only: no log-det wanted
                tr = z.new_zeros(z.shape[0])
            elif self.exact and isinstance(self.field, ODEVectorField):
                pass
            elif self.exact:
                tr = z.new_zeros(z.shape[0])
                for i in range(z.shape[1]):
                    tr = tr + torch.autograd.grad(dz[:, i].sum(), z, create_graph=create_graph,
                                                  retain_graph=True)[0][:, i]
            else:
                e = self.probe
                tr = (torch.autograd.grad(dz, z, e, create_graph=create_graph)[0] * e).sum(1)
        if not create_graph:
            dz, tr = dz.detach(), tr.detach()
        return dz, tr


class CNF(Transform):
    """A continuous normalizing flow layer over vectors ``(B, D)`` (FFJORD).

    Args:
        features: ``D``.
        hidden_features, num_layers, context_features, activation: the :class:`ODEVectorField`
            (or pass ``field``, any module ``field(t, z, context) -> dz``).
        method: torchdiffeq method (``"dopri5"`` adaptive with ``rtol``/``atol``; ``"rk4"`` fixed
            step ``step_size``; the others torchdiffeq offers likewise).
        rtol, atol: tolerances of adaptive methods.
        step_size: step of fixed-step methods (in units of ``t1``).
        adjoint: solve by ``torchdiffeq.odeint_adjoint`` (memory O(1) in the steps).
        trace: trace route in training mode, ``"hutchinson"`` (default) or ``"exact"``.
        eval_trace: in eval mode; ``"auto"`` is exact for ``D <= exact_max_features``.
        probe: Hutchinson probe, ``"rademacher"`` (lower variance; FFJORD's default) or ``"gaussian"``.
        t1: the integration time.
        max_num_steps: the most solver steps a solve may take (adaptive methods: accepted and
            rejected steps; fixed-step ones: ``ceil(1 / step_size)``, checked here).

    ``last_solve_info`` holds the number of vector-field evaluations of the latest solve.
    """

    def __init__(self, features, hidden_features=64, num_layers=3, context_features=None, activation="tanh",
                 method="dopri5", rtol=1e-5, atol=1e-5, step_size=0.05, adjoint=False, trace="hutchinson",
                 eval_trace="auto", probe="rademacher", exact_max_features=64, t1=1.0, field=None,
                 max_num_steps=1000):
        super().__init__()
        if isinstance(features, bool) or not isinstance(features, numbers.Integral):
            raise TypeError(f"CNF: features must be an integer, got {features!r}")
        if features < 1:
            raise ValueError(f"CNF: features must be >= 1, got {features}")
        if method not in FIXED_STEP + ADAPTIVE:
            raise ValueError(f"CNF: method={method!r}, expected one of {FIXED_STEP + ADAPTIVE}")
        if trace not in TRACES:
            raise ValueError(f"CNF: trace={trace!r}, expected one of {TRACES}")
        if eval_trace not in TRACES + ("auto",):
            raise ValueError(f"CNF: eval_trace={eval_trace!r}, expected 'auto' or one of {TRACES}")
        if probe not in PROBES:
            raise ValueError(f"CNF: probe={probe!r}, expected one of {PROBES}")
        t1 = _real("t1", t1, positive=True)
        rtol, atol = _real("rtol", rtol), _real("atol", atol)
        if method in ADAPTIVE and rtol == 0 and atol == 0:
            raise ValueError(f"CNF: rtol and atol are both 0 for method={method!r}; no step could be accepted")
        if isinstance(max_num_steps, bool) or not isinstance(max_num_steps, numbers.Integral) or max_num_steps < 1:
            raise ValueError(f"CNF: max_num_steps must be an integer >= 1, got {max_num_steps!r}")
        max_num_steps = int(max_num_steps)
        if method in FIXED_STEP:
            step_size = _real("step_size", step_size, positive=True)
            steps = math.ceil(1.0 / step_size)
            if steps > max_num_steps:
                raise ValueError(f"CNF: method={method!r} with step_size={step_size!r} takes {steps} steps, more "
                                 f"than max_num_steps={max_num_steps} (raise max_num_steps to allow it)")
        self.features = int(features)
        self.context_features = context_features
        self.field = field if field is not None else ODEVectorField(features, hidden_features, num_layers,
                                                                    context_features, activation)
        self.dynamics = _Dynamics(self.field)
        self.method, self.rtol, self.atol, self.step_size = method, rtol, atol, step_size
        self.adjoint, self.trace, self.eval_trace, self.probe = adjoint, trace, eval_trace, probe
        self.exact_max_features, self.t1, self.max_num_steps = exact_max_features, t1, max_num_steps
        self.last_solve_info: dict = {}
        self._trace_override = None  # "none" while sampling without log-densities

    @contextlib.contextmanager
    def without_trace(self):
        """Solves inside this block skip the trace (their log-dets are zeros): for plain sampling."""
        self._trace_override = "none"
        try:
            yield
        finally:
            self._trace_override = None

    def _check(self, x, what):
        if x.dim() != 2 or x.shape[1] != self.features:
            raise ValueError(f"CNF: {what} must have shape (B, {self.features}), got {tuple(x.shape)}")

    def _exact(self):
        route = self.trace if self.training else self.eval_trace
        if route == "auto":
            return self.features <= self.exact_max_features
        return route == "exact"

    # read by fastflow.compile: the ODE solve (adaptive steps until the tolerance is met) runs eagerly
    graph_breaks = "the ODE solve runs eagerly (adaptive step count)"

    @torch.compiler.disable
    def _solve(self, x, context, t0, t1, trace=None):
        """The solve over the rows of ``x`` (and ``context``) that are finite; NaN in the others."""
        if trace not in (None, "none") + TRACES:
            raise ValueError(f"CNF: trace={trace!r}, expected None, 'none' or one of {TRACES}")
        if torch.compiler.is_exporting():
            return self._solve_traced(x, context, t0, t1, trace)
        finite = self._finite_rows(x, context)
        if bool(finite.all()):
            return self._solve_rows(x, context, t0, t1, trace)
        rows = finite.nonzero().squeeze(1)
        z, lad = x.new_full(x.shape, math.nan), x.new_full(x.shape[:1], math.nan)
        if rows.numel():
            zr, lr = self._solve_rows(x[rows], None if context is None else context[rows], t0, t1, trace)
            z, lad = z.index_copy(0, rows, zr), lad.index_copy(0, rows, lr.to(lad.dtype))
        return z, lad

    def _solve_rows(self, x, context, t0, t1, trace):
        import torchdiffeq

        dyn = self.dynamics
        dyn.context = context
        trace = trace or self._trace_override
        dyn.exact = None if trace == "none" else (self._exact() if trace is None else trace == "exact")
        if dyn.exact is False:
            dyn.probe = (torch.randn_like(x) if self.probe == "gaussian"
                         else torch.randint(0, 2, x.shape, device=x.device).to(x.dtype) * 2 - 1)
        dyn.nfe = 0
        ts = torch.tensor([t0, t1], dtype=x.dtype, device=x.device)
        state = (x, x.new_zeros(x.shape[0]))
        kw = {"method": self.method}
        if self.method in FIXED_STEP:
            kw["options"] = {"step_size": self.step_size * self.t1}
        else:
            kw.update(rtol=self.rtol, atol=self.atol, options={"max_num_steps": self.max_num_steps})
        try:
            if self.adjoint:
                zs, ls = torchdiffeq.odeint_adjoint(dyn, state, ts, adjoint_params=tuple(self.field.parameters()),
                                                    **kw)
            else:
                zs, ls = torchdiffeq.odeint(dyn, state, ts, **kw)
        except AssertionError as exc:  # torchdiffeq reports a failed solve by assert
            raise ODESolverError(
                f"CNF: the ODE solve from t={t0:g} to t={t1:g} failed after {dyn.nfe} field evaluations "
                f"(method={self.method!r}, rtol={self.rtol:g}, atol={self.atol:g}, t1={self.t1:g}, "
                f"max_num_steps={self.max_num_steps}, dtype={str(x.dtype).replace('torch.', '')}): {exc}. "
                "Tolerances below the dtype's resolution, a very large t1 or a stiff or exploding vector "
                "field cause this; loosen rtol/atol, shorten t1, or raise max_num_steps") from exc
        finally:
            dyn.context, dyn.probe = None, None
        self.last_solve_info = {"nfe": dyn.nfe, "method": self.method, "exact_trace": dyn.exact}
        return zs[-1], ls[-1]

    @staticmethod
    def _per_row(x, context) -> bool:
        return isinstance(context, torch.Tensor) and context.dim() >= 1 and context.shape[0] == x.shape[0]

    def _finite_rows(self, x, context):
        """``(B,)``: the rows of ``x`` (and of a per-row ``context``) without NaN or infinity."""
        finite = torch.isfinite(x).all(1)
        if self._per_row(x, context):
            finite &= torch.isfinite(context.reshape(x.shape[0], -1)).all(1)
        return finite

    def _solve_traced(self, x, context, t0, t1, trace=None):
        """The solve as ``torch.export`` traces it (:mod:`fastflow.nn._ode`: torchdiffeq's
        algorithm without host syncs): the exact trace in closed form; a non-finite row is
        solved as zeros and comes out NaN (eager leaves it out of the solve: with an adaptive
        method the shared step sizes can then differ, within the tolerances); NaN where eager
        raises."""
        from fastflow.nn import _ode

        trace = trace or self._trace_override
        exact = None if trace == "none" else (self._exact() if trace is None else trace == "exact")
        if exact is False:
            raise ValueError("CNF: the Hutchinson trace draws random probes and uses autograd in the forward, so it "
                             "cannot be exported; put the model in eval mode with eval_trace='exact' "
                             "(or D <= exact_max_features)")
        if exact and not isinstance(self.field, ODEVectorField):
            raise ValueError(f"CNF: the exact trace of a custom field ({type(self.field).__name__}) needs autograd in "
                             "the forward, so it cannot be exported; ODEVectorField's trace is closed form")
        if self.method not in _ode.TRACED_METHODS:
            raise ValueError(f"CNF: method={self.method!r} cannot be exported; the exported solve has "
                             f"{_ode.TRACED_METHODS}")
        finite = self._finite_rows(x, context)
        if self._per_row(x, context):
            context = torch.where(finite.reshape(-1, *([1] * (context.dim() - 1))), context, 0)
        x = torch.where(finite[:, None], x, 0)
        b, d = x.shape
        n = b * d

        def f(t, y):
            z = y[:n].view(b, d)
            if exact:
                dz, tr = self.field.value_and_trace(t, z, context)
            else:
                dz, tr = self.field(t, z, context), z.new_zeros(b)
            return torch.cat([dz.reshape(-1), tr.reshape(-1)])

        y = _ode.solve(f, torch.cat([x.reshape(-1), x.new_zeros(b)]), t0, t1, self.method,
                       step_size=self.step_size * self.t1, rtol=self.rtol, atol=self.atol,
                       max_num_steps=self.max_num_steps, parts=(n, b))
        nan = torch.full_like(y[n:], math.nan)
        return (torch.where(finite[:, None], y[:n].view(b, d), nan[:, None]), torch.where(finite, y[n:], nan))

    def forward(self, x, context=None, trace=None):
        """Data to noise: ``(z, log|det dz/dx|)``, integrating from ``t1`` to 0."""
        self._check(x, "x")
        if x.shape[0] == 0:
            return x.clone(), x.new_zeros(0)
        z, l0 = self._solve(x, context, self.t1, 0.0, trace)
        return z, l0  # l(0) = -int_0^t1 tr dt with l(t1) = 0

    def inverse(self, z, context=None, trace=None):
        """Noise to data: ``(x, log|det dx/dz|)``, integrating from 0 to ``t1``."""
        self._check(z, "z")
        if z.shape[0] == 0:
            return z.clone(), z.new_zeros(0)
        return self._solve(z, context, 0.0, self.t1, trace)

    def flow_matching_loss(self, x1, x0, context=None, sigma_min=1e-4, t=None):
        """Conditional flow matching with the optimal-transport path (Lipman et al., 2023, eq. 20-23):
        ``x_t = (1 - (1 - sigma_min) t) x0 + t x1``, target ``u = x1 - (1 - sigma_min) x0``; the
        loss is ``E ||v(x_t, t) - u||^2`` (sum over features, mean over the batch). No ODE solve.

        Args:
            x1: data ``(B, D)``; x0: base samples ``(B, D)``; t: times in ``[0, 1]`` ``(B,)``
                (default uniform), scaled by ``t1``.
        """
        self._check(x1, "x1")
        self._check(x0, "x0")
        if x1.shape[0] == 0:
            return x1.new_zeros(()).requires_grad_(x1.requires_grad)
        t = torch.rand(x1.shape[0], 1, dtype=x1.dtype, device=x1.device) if t is None else t.reshape(-1, 1)
        xt = (1 - (1 - sigma_min) * t) * x0 + t * x1
        u = (x1 - (1 - sigma_min) * x0) / self.t1
        v = self.field(t * self.t1, xt, context)
        return (v - u).pow(2).sum(1).mean()

    def extra_repr(self):
        return (f"features={self.features}, method={self.method!r}, trace={self.trace!r}, "
                f"eval_trace={self.eval_trace!r}, adjoint={self.adjoint}, max_num_steps={self.max_num_steps}")
