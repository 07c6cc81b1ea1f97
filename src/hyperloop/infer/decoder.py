"""Running a model token by token: `Decoder` (KV cache) and `FullRecompute` (no cache, for checking).

Both have the same two calls, so `generate` does not care which it drives:
    prefill(prompts) -> logits (B, V)             next-token logits after each prompt
    step(tokens, finished) -> logits, loops_used  feed one token per row, get the next logits

On CUDA the decode step is captured once as a CUDA graph and replayed: a step of an S-size model is
a few hundred small kernels, and launching them one by one from Python costs more than running them.
`compile=True` first runs the step through torch.compile (fused kernels) and captures that. An int4
model decoding one row runs each layer in five kernels of its own (int4_block.py; `fuse_int4=False`
keeps the layer op by op, for comparisons), and each site boundary of a Hyperloop or mHC model in one
(model/decode_site.py; also in an uncompiled step, and mHC's in any), or, for mHC's between two
fused int4 sub-layers, in none: folded into the GEMVs around it. With
early exit, whose control flow depends on the logits, the (uncompiled) step is captured as one graph
per loop, and the host reads whether every row has exited between their replays. On CPU the step
runs eagerly.
"""

from __future__ import annotations

import contextlib
import gc

import torch

from hyperloop.config import ModelConfig
from hyperloop.errors import HyperloopError
from hyperloop.infer.cache import KVCache
from hyperloop.infer.early_exit import AllRowsExited, EarlyExit
from hyperloop.infer.int4_block import FusedInt4Blocks
from hyperloop.model import HyperloopLM, decode_site
from hyperloop.quant.linear import QuantLinear

WARMUP_STEPS = 3  # before capture: torch.compile compiles and autotunes, cuBLAS picks its kernels
# A compiled step is specialised to the cache's shape, so a cache sized to each request would compile
# again for every new prompt length: a compiled decoder's cache is rounded up to a multiple of this many
# columns (on CUDA a decode step visits only the filled ones, so the rounding costs memory, not time).
COMPILED_CACHE_MULTIPLE = 256
# Every decoder compiles the same step function for its own shapes (or model), and dynamo caps the
# versions of one function (8 by default, fatal under fullgraph): a long-lived process serving requests
# of many shapes would stop at the ninth. The compiled step raises the cap to this.
COMPILED_VERSIONS = 256


def synchronize(device: torch.device) -> None:
    """Wait for the device (for timings): CUDA runs asynchronously, the CPU does not."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def short_fallback_messages():
    """Inductor before pytorch/pytorch#185951 (torch 2.11 among them) builds the message "Creating
    implicit fallback for ..." of each custom op it first meets whether or not it is logged, printing
    every argument's whole IR, which recurses into the IR of the argument's inputs: a DAG printed as a
    tree, exponential in the depth at which the op first appears. An mHC step whose sites are folded
    into the int4 GEMVs did not finish compiling. Inside this context the message names only the op."""
    from torch._inductor import exc  # imported here: importing inductor is slow

    issue = getattr(exc, "OperatorIssue", None)
    full = vars(issue).get("operator_str") if issue is not None else None
    if full is None:  # an inductor without it: nothing to shorten
        yield
        return
    issue.operator_str = staticmethod(lambda target, args, kwargs: f"  target: {target}")
    try:
        yield
    finally:
        issue.operator_str = full


def resolve_loops(cfg: ModelConfig, num_loops: int | None) -> int:
    """The loop count to run: the trained one by default. Past the trained count the last loop's
    hyper-connection (with its loop embedding e_l) and LoRA adapter are reused (see model/lm.py)."""
    loops = cfg.num_loops if num_loops is None else num_loops
    if loops < 1:
        raise HyperloopError(f"--loops must be at least 1, got {loops}")
    if loops != cfg.num_loops and cfg.hc_placement == "sublayer":
        raise HyperloopError(f"an mHC model has one hyper-connection per unrolled sub-layer, so it runs exactly "
                             f"its trained {cfg.num_loops} loop(s); drop --loops")  # fmt: skip
    return loops


def left_pad(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) tokens, each prompt right-aligned (padding id 0, masked by the cache), and the pad counts."""
    width = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
    pad = torch.tensor([width - len(p) for p in prompts], dtype=torch.long)
    return tokens.to(device), pad.to(device)


@contextlib.contextmanager
def collector_paused():
    """Keep Python's cyclic garbage collector from running while a CUDA graph is recorded. A dead
    decoder of an earlier batch holds its graph in a reference cycle (itself -> its bound step), so
    only the collector frees it, whenever an allocation happens to trigger it; destroying a graph
    mid-capture is an operation the capture forbids, and it fails at the next kernel with an unrelated
    error (CUBLAS_STATUS_EXECUTION_FAILED). torch.cuda.graph stopped collecting before each capture
    in PyTorch 2.9 (pytorch/pytorch#161037), so we collect here, then pause the collector."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class Decoder:
    """A model and a KV cache for `batch` rows of up to `max_len` tokens (prompt + generated)."""

    def __init__(self, model: HyperloopLM, batch: int, max_len: int, *, num_loops: int | None = None,
                 exit_threshold: float | None = None, cuda_graph: bool | None = None, compile: bool = False,
                 fuse_int4: bool = True):  # fmt: skip
        cfg = model.cfg
        if max_len > cfg.max_seq_len:
            raise HyperloopError(f"{max_len} tokens (prompt + new tokens) exceed the model's context of "
                                 f"{cfg.max_seq_len}; shorten the prompt or lower --max-new-tokens")  # fmt: skip
        self.model, self.max_len = model, max_len
        self.num_loops = resolve_loops(cfg, num_loops)
        cache_len = max_len
        if compile:
            cache_len = min(cfg.max_seq_len, -(-max_len // COMPILED_CACHE_MULTIPLE) * COMPILED_CACHE_MULTIPLE)
        self.cache = KVCache.for_model(model, batch, cache_len, self.num_loops)
        self.early_exit = None
        if exit_threshold is not None:
            self.early_exit = EarlyExit(model, self.cache, exit_threshold, self.num_loops)
        on_cuda = self.cache.device.type == "cuda"
        if on_cuda and batch == 1 and exit_threshold is None and fuse_int4:
            self.cache.fused_block = FusedInt4Blocks.for_model(model)
        if on_cuda:  # one kernel a site boundary, where it is faster (model/decode_site.py)
            decode_site.enable(model, compiled_layers=compile and self.cache.fused_block is None)
            if self.cache.fused_block is not None:  # mHC's sites: no kernel at all
                self.cache.fused_block.fold_sites = decode_site.folds(model)
        self.cuda_graph = on_cuda and cuda_graph is not False
        self._decode = self._run
        if compile:
            fused = {id(m) for m in self.cache.fused_block.linears} if self.cache.fused_block is not None else set()
            for module in model.modules():
                if isinstance(module, QuantLinear) and id(module) not in fused:
                    module.prepare_kernel(batch)
            compiled = torch.compile(self._run, fullgraph=True, dynamic=False)

            def decode(tokens: torch.Tensor) -> torch.Tensor:
                with torch._dynamo.config.patch(recompile_limit=COMPILED_VERSIONS), short_fallback_messages():
                    return compiled(tokens)

            self._decode = decode
        self._graph: torch.cuda.CUDAGraph | None = None
        self._loop_graphs: list[torch.cuda.CUDAGraph] = []  # early exit: one graph per loop
        self.length = 0  # columns filled (a Python mirror of cache.column, to check capacity without a sync)

    @property
    def device(self) -> torch.device:
        return self.cache.device

    def _run(self, tokens: torch.Tensor) -> torch.Tensor:
        """One forward over (B, T) new tokens through the cache: logits (B, V) of the last column."""
        positions = self.cache.start(tokens.shape[1])
        hidden = self.model.hidden_states(
            tokens, num_loops=self.num_loops, positions=positions, cache=self.cache
        )
        self.cache.advance(tokens.shape[1])
        return self.model.logits(hidden[:, -1])

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Run the prompts at full depth (early exit applies to generated tokens only)."""
        if len(prompts) != self.cache.batch:
            raise HyperloopError(f"this decoder holds {self.cache.batch} rows, got {len(prompts)} prompts")
        tokens, pad = left_pad(prompts, self.device)
        self._reserve(tokens.shape[1], reset=True)
        self.cache.reset(pad)
        return self._run(tokens)

    @torch.no_grad()
    def step(
        self, tokens: torch.Tensor, finished: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed one token per row (B,); rows marked `finished` are computed but never read."""
        self._reserve(1)
        if self.early_exit is not None:
            finished = torch.zeros_like(tokens, dtype=torch.bool) if finished is None else finished
            if self.cuda_graph:
                return self._replay_exit(tokens[:, None], finished)
            return self._exit_step(tokens[:, None], finished)
        logits = self._replay(tokens[:, None]) if self.cuda_graph else self._decode(tokens[:, None])
        return logits, torch.full_like(tokens, self.num_loops)

    def _reserve(self, T: int, reset: bool = False) -> None:
        self.length = (0 if reset else self.length) + T
        if self.length > self.max_len:
            raise HyperloopError(
                f"the KV cache holds {self.max_len} tokens per row; this step needs {self.length}"
            )

    def _exit_forward(self, tokens: torch.Tensor, finished: torch.Tensor) -> torch.Tensor | None:
        """The forward of an early-exit step: the logits of the rows that ran every loop, or None
        when every row exited (the probe already ran the end block and holds their logits)."""
        self.cache.start(1)
        self.early_exit.start(finished)
        try:
            hidden = self.model.hidden_states(tokens, num_loops=self.num_loops, positions=self.cache.positions,
                                              cache=self.cache, on_loop_end=self.early_exit)  # fmt: skip
        except AllRowsExited:
            return None
        return self.model.logits(hidden[:, -1])

    def _exit_step(self, tokens: torch.Tensor, finished: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self._exit_forward(tokens, finished)
        self.cache.advance(1)
        return self.early_exit.finish(logits)

    # ---------------------------------------------------------------------------- CUDA graph
    def _replay(self, tokens: torch.Tensor) -> torch.Tensor:
        if self._graph is None:
            self._tokens = tokens.clone()
            self._capture()
        self._tokens.copy_(tokens)
        self._graph.replay()
        return self._logits.clone()  # the graph overwrites its output buffer on the next replay

    def _warm_up(self, forward) -> None:
        """Run the step a few times on a side stream before recording it. The warm-up steps write the
        same keys/values at the same column as the real step will, and the column is rewound after
        each; recording executes nothing, so the first replay is the real step."""
        column = self.cache.column.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                forward()
                self.cache.column.copy_(column)
        torch.cuda.current_stream().wait_stream(side)

    def _capture(self) -> None:
        self._warm_up(lambda: self._decode(self._tokens))
        self._graph = torch.cuda.CUDAGraph()
        with collector_paused(), torch.cuda.graph(self._graph):
            self._logits = self._decode(self._tokens)

    def _replay_exit(self, tokens: torch.Tensor, finished: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._loop_graphs:
            self._tokens, self._finished = tokens.clone(), finished.clone()
            self._capture_exit()
        self._tokens.copy_(tokens)
        self._finished.copy_(finished)
        logits = None
        for loop, graph in enumerate(self._loop_graphs):
            graph.replay()
            if loop < self.num_loops - 1 and bool(self.early_exit.exited.all()):
                break  # every row exited at this loop's probe: the later loops' graphs are skipped
        else:
            logits = self._logits
        self.cache.advance(1)
        return self.early_exit.finish(logits)

    def _capture_exit(self) -> None:
        """Record the early-exit step as one graph per loop. The probe after loop l ends graph l and
        begins graph l + 1, so the forward runs once, straight through, while being recorded in
        pieces; the pieces share one memory pool and are always replayed in order (a prefix of them),
        which keeps each one's inputs where the previous one left them."""
        self._warm_up(lambda: self._exit_forward(self._tokens, self._finished))
        pool = torch.cuda.graph_pool_handle()
        self._loop_graphs = [torch.cuda.CUDAGraph() for _ in range(self.num_loops)]
        recording = [torch.cuda.graph(self._loop_graphs[0], pool=pool)]

        def next_graph() -> None:
            recording[-1].__exit__(None, None, None)
            recording.append(torch.cuda.graph(self._loop_graphs[len(recording)], pool=pool))
            recording[-1].__enter__()

        with collector_paused():
            recording[0].__enter__()
            self.early_exit.segment_end = next_graph
            try:
                self._logits = self._exit_forward(self._tokens, self._finished)
            finally:
                self.early_exit.segment_end = None
                recording[-1].__exit__(None, None, None)


class FullRecompute:
    """`--no-cache`: every step runs the plain full forward over each row's whole sequence. Quadratic
    and slow on purpose: it shares nothing with the cache, so it checks it."""

    def __init__(self, model: HyperloopLM, num_loops: int | None = None):
        self.model = model
        self.num_loops = resolve_loops(model.cfg, num_loops)

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        self.sequences = [list(p) for p in prompts]
        return self._next_logits()

    @torch.no_grad()
    def step(
        self, tokens: torch.Tensor, finished: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for sequence, token in zip(self.sequences, tokens.tolist(), strict=True):
            sequence.append(token)
        return self._next_logits(), torch.full_like(tokens, self.num_loops)

    def _next_logits(self) -> torch.Tensor:
        device = self.model.embed.weight.device
        rows = [torch.tensor(seq, device=device)[None] for seq in self.sequences]
        return torch.cat([self.model(row, num_loops=self.num_loops)[:, -1] for row in rows])
