"""Continuous batching at the level of steps: requests join and leave a running latent chain between passes.

Each :meth:`LiveBatch.tick` advances every active request by one unit — one latent step or one answer token, all
in one decoder pass over one shared key/value cache — and gives the requests that join their prompt pass, in a pass
of their own (a prompt is a hundred rows and more: in the shared pass every request would carry that width), after
which they join the shared cache. A request leaves as soon as it is done;
:meth:`~ivtlr.method.chain.ChainRunner.compact` keeps the cache about as wide as the longest request. Every
request's keys, positions and attention rows are its own, so its answer is the one
:meth:`IVTLR.generate <ivtlr.method.engine.IVTLR.generate>` gives for it alone, whatever else is in flight.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ivtlr.method.chain import IGNORE_INDEX, ChainRunner, SampleState, Segment
from ivtlr.method.interventions import NO_INTERVENTION, LatentIntervention
from ivtlr.method.layout import Layout
from ivtlr.method.sampling import TokenPicker

if TYPE_CHECKING:
    from ivtlr.method.engine import IVTLR


@dataclass
class LiveRequest:
    """One question in a :class:`LiveBatch`: what it asked for and how far it got."""

    layout: Layout
    prompt: Segment
    next_position: int
    max_new_tokens: int
    eos: set[int]
    picker: TokenPicker
    tag: Any = None  # the caller's handle (a request id)
    intervention: LatentIntervention = NO_INTERVENTION  # e.g. its own K
    state: SampleState | None = None  # set once it joined the chain
    steps_done: int = 0  # latent steps computed
    rows: torch.Tensor | None = None  # attention row that ranks the next latent step's patches
    taken: torch.Tensor | None = None
    selected: list[torch.Tensor] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    finished: bool = False

    @property
    def n_latent(self) -> int:
        return self.layout.n_latent

    @property
    def phase(self) -> str:
        """``prompt`` (waiting for its prompt pass), ``latent`` (latent steps to go), ``answer``, or ``done``."""
        if self.finished:
            return "done"
        if self.state is None:
            return "prompt"
        return "latent" if self.steps_done < self.n_latent else "answer"


@dataclass
class TickEvent:
    """What one request gained in a tick: a latent step's patches, a token, or its end."""

    request: LiveRequest
    kind: str  # "latent" | "token"
    value: Any  # the chosen patch indices (a tensor) or the token id
    finished: bool = False


class LiveBatch:
    """Requests at different phases of the IVT-LR chain, advanced together one unit per :meth:`tick`."""

    def __init__(self, engine: IVTLR):
        self.engine = engine
        self.runner: ChainRunner | None = None
        self.active: list[LiveRequest] = []  # in the runner's sample order
        self.waiting: list[LiveRequest] = []  # admitted, joining at the next tick

    def __len__(self) -> int:
        return len(self.active) + len(self.waiting)

    @torch.no_grad()
    def admit(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, max_new_tokens: int = 64,
              eos_token_id: int | list[int] | None = None, do_sample: bool = False, temperature: float = 1.0,
              top_p: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None, tag: Any = None,
              intervention: LatentIntervention | None = None, **vision_inputs: torch.Tensor | None) -> LiveRequest:
        """Queue one question (a batch of one, as :meth:`IVTLR.generate` takes it) to join at the next tick. Its
        image is encoded here, once. ``intervention`` applies to this question only (e.g. its own K)."""
        if input_ids.shape[0] != 1:
            raise ValueError(f"admit takes one question at a time, got a batch of {input_ids.shape[0]}")
        engine = self.engine
        vision = {key: value for key, value in vision_inputs.items() if value is not None}
        (layout,) = engine.builder.layouts(input_ids, attention_mask, None, vision)
        (prompt,), (next_position,) = engine.builder.prompt_segments([layout], vision)
        eos = engine.eos_token_ids if eos_token_id is None else \
            set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
        request = LiveRequest(layout=layout, prompt=prompt, next_position=int(next_position),
                              max_new_tokens=max_new_tokens, eos=eos,
                              picker=TokenPicker(do_sample, temperature, top_p, top_k, generator), tag=tag,
                              intervention=intervention or NO_INTERVENTION)
        self.waiting.append(request)
        return request

    def cancel(self, request: LiveRequest) -> None:
        """Stop a request (its client went away): it leaves at the end of the next tick, or now if it was waiting."""
        request.finished = True
        if request in self.waiting:
            self.waiting.remove(request)

    @torch.no_grad()
    def tick(self) -> list[TickEvent]:
        """Advance every active request by one unit and give the waiting ones their prompt pass; returns what each
        gained."""
        joining, self.waiting = self.waiting, []
        events = []
        if self.active or joining:
            self.engine.prepare_row_kernel()
        segments = [self._next_segment(request) for request in self.active]
        # No pass when every request in flight was cancelled since the last tick: they only leave (below).
        if any(segment is not None for segment in segments):
            # Attention rows are needed where a latent step follows this pass (every latent step but the last).
            query = any(segment is not None and request.steps_done + 1 < request.n_latent
                        for request, segment in zip(self.active, segments))
            rows = self.runner.run(segments, query=query, grad=False)
            if self._wasted():
                rows = self.runner.compact(rows)
            events += self._advance(self.active, rows)
        if joining:
            events += self._join(joining)
        self._retire()
        return events

    # ------------------------------------------------------------------------------------------ internals
    def _join(self, joining: list[LiveRequest]) -> list[TickEvent]:
        """The joining requests' prompt pass, on a chain of their own, which then joins the shared one."""
        for request in joining:
            request.state = SampleState(next_position=request.next_position)
            request.taken = torch.zeros(len(request.layout.image_index), dtype=torch.bool,
                                        device=request.layout.ids.device)
        first = joining[0].layout
        runner = ChainRunner(self.engine.backbone, self.engine.recorder, [request.state for request in joining],
                             cached=True, dtype=first.embeds.dtype, device=first.ids.device,
                             vision_bottleneck=self.engine.vision_bottleneck)
        rows = runner.run([request.prompt for request in joining],
                          query=any(request.n_latent > 0 for request in joining), grad=False)
        events = self._advance(joining, rows)
        if self.runner is None:
            self.runner = runner
        else:
            self.runner.merge(runner)
        self.active.extend(joining)
        return events

    def _next_segment(self, request: LiveRequest) -> Segment | None:
        """The rows the request adds this pass: its prompt, its next latent step, or its last token."""
        if request.finished:
            return None
        if request.steps_done < request.n_latent:
            return self.engine.builder.latent_step_segment(request.layout, request.state, request.state.segments[-1]
                                                           .hidden[-1], request.rows, request.taken,
                                                           request.selected, request.steps_done + 1,
                                                           request.intervention)
        backbone = self.engine.backbone
        device = request.layout.ids.device
        token = torch.tensor([request.tokens[-1]], device=device)
        return Segment(backbone.input_embeddings()(token), request.state.positions(1, backbone.position_rows, device),
                       torch.full((1,), IGNORE_INDEX, device=device))

    def _advance(self, requests: list[LiveRequest], rows: torch.Tensor | None) -> list[TickEvent]:
        """Book what the pass over ``requests`` computed: a latent step's rows, or each answering request's next
        token."""
        events, answering = [], []
        for b, request in enumerate(requests):
            if request.finished:
                continue
            segment = request.state.segments[-1]
            if segment.latent_row is not None and len(request.selected) > request.steps_done:
                request.steps_done += 1
                events.append(TickEvent(request, "latent", request.selected[-1]))
            if request.steps_done < request.n_latent:
                request.rows = rows[b] if rows is not None else None
            else:
                answering.append(request)
        if answering:
            hidden = torch.stack([request.state.segments[-1].hidden[-1] for request in answering])
            logits = self.engine.backbone.logits(hidden.unsqueeze(1))[:, -1].float()
            for request, row in zip(answering, logits):
                token = int(request.picker(row.unsqueeze(0))[0])
                request.tokens.append(token)
                request.finished = token in request.eos or len(request.tokens) >= request.max_new_tokens
                events.append(TickEvent(request, "token", token, finished=request.finished))
        return events

    def _wasted(self) -> bool:
        """Whether a quarter of the cache's columns hold no request's keys (left by requests that finished).
        Compacting moves every cached key, so it waits until it pays."""
        mask = self.runner.key_mask
        return mask.shape[1] > 0 and int(mask.sum(1).max()) < 0.75 * mask.shape[1]

    def _retire(self) -> None:
        keep = [b for b, request in enumerate(self.active) if not request.finished]
        if len(keep) == len(self.active):
            return
        self.active = [self.active[b] for b in keep]
        if keep:
            self.runner.retire(keep)
        else:
            self.runner = None


def vision_of(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The processor outputs of a generation batch other than the ids and the mask (what :meth:`LiveBatch.admit`
    takes as keyword arguments)."""
    return {key: value for key, value in batch.items() if key not in ("input_ids", "attention_mask")}
