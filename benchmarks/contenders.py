"""Everything the benchmark races: our backends, the reference, and the peers.

Each contender builds an optimizer over the parameters it is given and returns
its step; a contender that cannot run here says why (``unavailable``) and is
skipped with that reason, never silently.
"""

import importlib
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from largedet_kernels import PMDLAMB, dispatch, reference

# One setting for every LAMB-family contender: the paper's, with LAMB's bias correction off.
LR, BETAS, EPS, WEIGHT_DECAY, ALPHA, CYCLE = 1e-3, (0.9, 0.999), 1e-6, 5e-4, 0.012, 200

Step = Callable[[], None]


@dataclass
class Contender:
    name: str
    make: Callable[[List[torch.nn.Parameter]], Step]
    unavailable: Callable[[torch.device], Optional[str]]
    capturable: bool = False  # its step can be captured in a CUDA graph
    note: str = ""
    dtypes: Optional[Tuple[torch.dtype, ...]] = None  # the parameter dtypes it takes; None: any

    def refuses(self, dtype: torch.dtype) -> Optional[str]:
        """Why it cannot step parameters of this dtype; None when it can."""
        if self.dtypes is None or dtype in self.dtypes:
            return None
        return f"{self.name} takes {' and '.join(str(d).removeprefix('torch.') for d in self.dtypes)} parameters only"


def _reference_update(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> None:
    x = p.float() if p.dtype != torch.float32 else p
    reference.pmd_lamb_step(x, g.float(), m, v, t, lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
                            weight_decay=WEIGHT_DECAY, alpha=ALPHA, cycle_length=CYCLE)  # fmt: skip
    if x is not p:
        p.copy_(x)


class ReferenceLoop:
    """The reference, one tensor after another: the naive baseline.

    Compiled, the per-tensor update is one ``torch.compile`` graph with dynamic sizes
    over flattened tensors, reused by every tensor (compiling the whole loop instead
    takes minutes for a few hundred tensors); ``t`` is a tensor so nothing recompiles
    as it advances.
    """

    def __init__(self, params: List[torch.nn.Parameter], compiled: bool = False) -> None:
        self.params = params
        self.m = [torch.zeros(p.numel(), dtype=torch.float32, device=p.device) for p in params]
        self.v = [torch.zeros(p.numel(), dtype=torch.float32, device=p.device) for p in params]
        self.t = torch.zeros((), dtype=torch.float32, device=params[0].device)
        self.update = torch.compile(_reference_update, dynamic=True) if compiled else _reference_update

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        for p, m, v in zip(self.params, self.m, self.v):
            self.update(p.view(-1), p.grad.view(-1), m, v, self.t)


def _importable(module: str, how: str) -> Callable[[torch.device], Optional[str]]:
    def check(device: torch.device) -> Optional[str]:
        try:
            importlib.import_module(module)
        except Exception as err:  # an installed peer may fail to import for reasons of its own
            return f"{module} is not importable ({type(err).__name__}: {err}); {how}"
        return None

    return check


def no_gpu_here(device: torch.device) -> Optional[str]:
    """Why a contender of CUDA devices skips a run on ``device``, as a reader of the table needs it."""
    if device.type == "cuda":
        return None
    return "no GPU here" if not torch.cuda.is_available() else f"the run is on {device}, not on a GPU"


def _cuda_only(check: Callable[[torch.device], Optional[str]], who: str) -> Callable[[torch.device], Optional[str]]:
    def unavailable(device: torch.device) -> Optional[str]:
        if device.type != "cuda":
            return f"{no_gpu_here(device)}: {who} runs on CUDA devices only"
        return check(device)

    return unavailable


def _pmdlamb_unavailable(backend: str) -> Callable[[torch.device], Optional[str]]:
    def unavailable(device: torch.device) -> Optional[str]:
        reason = dispatch.unavailable_reason(backend, device)
        if reason is not None and backend in ("cuda", "triton") and device.type != "cuda":
            return f"{no_gpu_here(device)}: the {backend} backend runs on CUDA devices"
        return reason

    return unavailable


def _pmdlamb(backend: str) -> Contender:
    return Contender(
        f"pmdlamb[{backend}]",
        lambda ps: PMDLAMB(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, alpha=ALPHA,
                           cycle_length=CYCLE, backend=backend).step,  # fmt: skip
        _pmdlamb_unavailable(backend),
        capturable=backend in ("cuda", "triton"),
    )


def _apex(ps):
    from apex.optimizers import FusedLAMB

    return FusedLAMB(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, bias_correction=False,
                     max_grad_norm=1e9).step  # fmt: skip


def _deepspeed(ps):
    from deepspeed.ops.lamb import FusedLamb

    return FusedLamb(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, bias_correction=False).step


def _timm(foreach: bool):
    def make(ps):
        from timm.optim import Lamb

        return Lamb(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, bias_correction=False,
                    foreach=foreach).step  # fmt: skip

    return make


def _fused_adamw(ps):
    return torch.optim.AdamW(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, fused=True).step


def _fused_adamw_unavailable(device: torch.device) -> Optional[str]:
    probe = torch.nn.Parameter(torch.zeros(1, device=device))
    try:
        torch.optim.AdamW([probe], fused=True)
    except RuntimeError as err:
        return f"torch.optim.AdamW(fused=True) refuses {device}: {err}"
    return None


CONTENDERS: List[Contender] = [
    *(_pmdlamb(b) for b in dispatch.BACKEND_NAMES),
    Contender("reference loop", lambda ps: ReferenceLoop(ps).step, lambda device: None,
              note="largedet_kernels.reference, one tensor at a time"),
    Contender("reference compiled", lambda ps: ReferenceLoop(ps, compiled=True).step, lambda device: None,
              note="the same loop under torch.compile"),
    Contender("apex FusedLAMB", _apex,
              _cuda_only(_importable("apex.optimizers", "build NVIDIA/apex with --cuda_ext"), "apex FusedLAMB"),
              dtypes=(torch.float32, torch.float16)),
    Contender("deepspeed FusedLamb", _deepspeed,
              _cuda_only(_importable("deepspeed.ops.lamb", "pip install deepspeed"), "DeepSpeed FusedLamb")),
    Contender("timm Lamb", _timm(False), _importable("timm.optim", "pip install timm"), note="per-tensor loop"),
    Contender("timm Lamb foreach", _timm(True), _importable("timm.optim", "pip install timm")),
    Contender("torch fused AdamW", _fused_adamw, _fused_adamw_unavailable, capturable=False,
              note="memory-bound yardstick: the same bytes class, no norms"),
]  # fmt: skip
